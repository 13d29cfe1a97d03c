"""A wheel built from the source tree works when installed: configs and suites ship inside the package."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    if shutil.which("pip") is None and subprocess.run([sys.executable, "-m", "pip", "--version"]).returncode:
        pytest.skip("pip is not available")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src-tree"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"), symlinks=False)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(src)], check=True, cwd=tmp, env=env, capture_output=True)
    wheel = next((tmp / "dist").glob("repbend-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp / "venv")], check=True, env=env)
    bindir = tmp / "venv" / ("Scripts" if os.name == "nt" else "bin")
    subprocess.run([str(bindir / "python"), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True,
                   env=env, capture_output=True)
    work = tmp / "elsewhere"
    work.mkdir()
    return bindir, work, env


def _run(venv, *args):
    bindir, work, env = venv
    return subprocess.run([str(bindir / "repbend"), *args], cwd=work, env=env, capture_output=True, text=True)


def test_the_installed_package_is_the_wheel(venv):
    bindir, work, env = venv
    out = subprocess.run([str(bindir / "python"), "-c", "import repbend; print(repbend.__file__)"], cwd=work, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert str(bindir.parent) in out


def test_shipped_configs_and_suites_work_from_an_installed_wheel(venv):
    # pipeline-quick names data-default, train-default and the quick suite, and validating it checks them all;
    # tune-default names train-default and the tune suite
    for args in (["validate", "pipeline-quick"], ["validate", "tune-default"], ["validate", "full", "--kind", "suite"]):
        proc = _run(venv, *args)
        assert proc.returncode == 0 and "valid" in proc.stdout, (args, proc.stderr)
    proc = _run(venv, "eval", "-o", "out", "-s", "quick", "--validate-only")
    assert proc.returncode == 0 and "suite quick: OK" in proc.stdout, proc.stderr
