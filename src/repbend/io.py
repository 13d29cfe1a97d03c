"""Small I/O helpers: atomic writes, JSONL, hashing, run metadata."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator

from repbend.errors import RepbendError


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same folder + rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one row and flush it to disk (used for resumable, incremental results)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl_numbered(path: str | Path, *, label: str = "", tolerate_truncated_tail: bool = False,
                        fix: str = "re-save it as UTF-8") -> list[tuple[int, dict]]:
    """``(line number, object)`` for each JSONL line, with one-line errors naming the file and line.

    ``label`` prefixes the file in messages (``"AdvBench file x.jsonl line 3 ..."``). With
    ``tolerate_truncated_tail`` a half-written last line (a crash mid-append) is dropped.
    """
    p = Path(path)
    where = f"{label} file {p}" if label else str(p)
    if not p.is_file():
        raise RepbendError(f"{where} does not exist.")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RepbendError(f"{where} is not UTF-8 text (byte {e.start}); {fix}.") from None
    rows = []
    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if tolerate_truncated_tail and i == len(lines):
                break
            raise RepbendError(f"{where} line {i} is not valid JSON; fix or remove that line.") from None
        if not isinstance(row, dict):
            raise RepbendError(f"{where} line {i} must be a JSON object, not {type(row).__name__}.")
        rows.append((i, row))
    return rows


def read_jsonl(path: str | Path, *, tolerate_truncated_tail: bool = False) -> list[dict]:
    """Read a JSONL file of objects (see :func:`read_jsonl_numbered`)."""
    return [row for _, row in read_jsonl_numbered(path, tolerate_truncated_tail=tolerate_truncated_tail)]


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    yield from read_jsonl(path)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_PACKAGES = ("repbend", "torch", "transformers", "peft", "accelerate", "gguf", "safetensors", "tokenizers",
             "numpy", "pydantic", "typer", "deepspeed", "nanogcg")


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    """The commit of the repbend source checkout, if it is one (``None`` for a wheel install)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_info(out_dir: str | Path, config: Any = None, seed: int | None = None, **extra: Any) -> dict:
    """Write ``config.yaml`` (resolved) and ``run_info.json`` (versions, git commit, seed, time)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config is not None:
        from repbend.config import dump_config
        atomic_write_text(out / "config.yaml", dump_config(config))
    info = {
        "seed": seed,
        "git_commit": git_commit(),
        "versions": package_versions(),
        "argv": sys.argv,
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    atomic_write_json(out / "run_info.json", info)
    return info
