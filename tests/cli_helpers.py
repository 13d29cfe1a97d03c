"""Run the ``repbend`` CLI in-process the way a user meets it: exit code, stdout, stderr."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

SRC = Path(__file__).resolve().parents[1] / "src"


def exit_code(argv) -> int:
    """``repbend ARGV`` through ``repbend.cli.main``; its exit code (output left to the caller's capsys)."""
    from repbend.cli import main

    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def cli(capsys, *args) -> tuple[int, str, str]:
    """``repbend ARGS`` through ``repbend.cli.main``; returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = exit_code(args)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *needles: str) -> str:
    """Assert exit 2 with exactly one ``error:`` line (the last one) and no traceback; returns that line."""
    assert code == 2, f"exit {code}; stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def write_train_yaml(cfg, path: Path, **changes) -> Path:
    data = cfg.model_dump(mode="json")
    data.update(changes)
    path.write_text(yaml.safe_dump(data))
    return path


class LockHolder:
    """Another process holding the repbend output lock of ``folders`` (as a concurrent run would)."""

    def __init__(self, *folders: Path):
        code = textwrap.dedent("""
            import contextlib, sys, time
            from pathlib import Path
            from repbend.io import output_lock
            with contextlib.ExitStack() as stack:
                for f in sys.argv[1:]:
                    stack.enter_context(output_lock(Path(f)))
                print("locked", flush=True)
                sys.stdin.read()
        """)
        env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen([sys.executable, "-c", code, *map(str, folders)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, text=True)
        line = self.proc.stdout.readline()
        assert line.strip() == "locked", line

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def try_lock_elsewhere(folder: Path) -> bool:
    """Whether another process can take ``folder``'s output lock right now."""
    code = ("import sys; from pathlib import Path; from repbend.io import output_lock\n"
            "from repbend.errors import RepbendError\n"
            "try:\n    with output_lock(Path(sys.argv[1])): pass\nexcept RepbendError: sys.exit(3)\n")
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rc = subprocess.run([sys.executable, "-c", code, str(folder)], env=env).returncode
    assert rc in (0, 3), rc
    return rc == 0
