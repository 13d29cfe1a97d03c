"""Small I/O helpers: atomic writes, JSONL, hashing, run metadata, user paths and output folders.

Output folders (``repbend train``, ``eval``, ``data build``, ``merge``): :func:`user_path` is the one place a path
the user gave is checked (empty -> error) and ``~``-expanded; :func:`output_lock` holds an exclusive lock on the
folder for the whole run (a second writer gets one line and exit 2); :func:`claim_output` refuses a non-empty
folder holding another kind of run or foreign files unless ``overwrite`` (then the earlier run's files are removed,
files repbend did not write are left alone). The run kind is recorded as ``kind`` in ``run_info.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Iterable, Iterator

from pydantic import AfterValidator

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


def torch_threads() -> int | None:
    """torch's intra-op thread count: float sums are split by it, so results reproduce bit for bit only at the
    same count (``None`` when torch is not imported, e.g. a config-only command)."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


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


def write_run_info(out_dir: str | Path, config: Any = None, seed: int | None = None, *, kind: str | None = None,
                   **extra: Any) -> dict:
    """Write ``config.yaml`` (resolved) and ``run_info.json`` (run kind, versions, git commit, seed, time)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config is not None:
        from repbend.config import dump_config
        atomic_write_text(out / "config.yaml", dump_config(config))
    info = {
        **({"kind": kind} if kind else {}),
        "seed": seed,
        "git_commit": git_commit(),
        "versions": package_versions(),
        "threads": torch_threads(),
        "argv": sys.argv,
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    atomic_write_json(out / "run_info.json", info)
    return info


# ---------------------------------------------------------------- user paths, output folders, locks

def user_path(value: str | os.PathLike | None, what: str = "path") -> Path:
    """A path the user gave, ``~`` expanded; an empty one (it would mean the current folder) is an error."""
    if value is None or not str(value).strip():
        raise RepbendError(f"{what} is empty; give a folder or file path (an empty path would mean the current "
                           f"folder).")
    return Path(os.path.expanduser(os.fspath(value)))


def _expand(value: str) -> str:
    if not value.strip():
        raise ValueError("is empty; give a folder path (an empty path would mean the current folder)")
    return os.path.expanduser(value)


def _expand_optional(value: str | None) -> str | None:
    return None if value is None else _expand(value)


# Config field types for paths the user gives (``~`` expanded, empty rejected), used by every config section.
UserPath = Annotated[str, AfterValidator(_expand)]
OptionalUserPath = Annotated["str | None", AfterValidator(_expand_optional)]

LOCK_FILE = ".repbend.lock"
# Files the tools write besides a run's own (never treated as content of a folder).
_IGNORED = frozenset({LOCK_FILE, ".stage-done.json"})

# What each kind of run writes into its folder (glob patterns): how a folder without a recorded kind is recognised
# (the "markers") and what ``overwrite`` removes when another kind of run replaces it (the "files").
RUN_KINDS: dict[str, dict] = {
    "train": {"what": "a training run",
              "markers": ("checkpoints", "metrics.csv"),
              "files": ("checkpoints", "metrics.csv", "layers.csv", "eval.csv", "tb", "loss.png",
                        "adapter_model.safetensors", "adapter_config.json", "model.safetensors",
                        "model-*.safetensors", "model.safetensors.index.json", "config.json",
                        "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                        "special_tokens_map.json", "chat_template.jinja", "README.md", "config.yaml",
                        "run_info.json")},
    "eval": {"what": "evaluation results",
             "markers": ("eval_target.json", "results.json", "cache.jsonl"),
             "files": ("eval_target.json", "results.json", "cache.jsonl", "completions.jsonl", "capability.json",
                       "report.md", "*.png", "config.yaml", "run_info.json")},
    "data": {"what": "a built dataset",
             "markers": ("manifest.json", ".build.json", "generations.jsonl"),
             "files": ("manifest.json", ".build.json", "generations.jsonl", "train.jsonl", "val.jsonl",
                       "decontam.jsonl", "config.yaml", "run_info.json")},
    "merge": {"what": "a merged model",
              "markers": (),
              "files": ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json", "config.json",
                        "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                        "special_tokens_map.json", "chat_template.jinja", "run_info.json")},
}


def folder_contents(folder: Path) -> list[Path]:
    """The entries of ``folder`` that count as content (not the lock file); [] for a missing folder."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name not in _IGNORED)


# run_info.json keys that only one kind of run writes (folders written before ``kind`` was recorded)
_INFO_KEYS = {"status": "train", "fingerprint": "eval", "config_hash": "data", "merged_from": "merge"}


def run_kind(folder: Path) -> str | None:
    """The kind of run in ``folder`` (``run_info.json``'s ``kind``, else recognised from its files), or None."""
    info: Any = {}
    if (folder / "run_info.json").is_file():
        try:
            info = json.loads((folder / "run_info.json").read_text(encoding="utf-8"))
        except (ValueError, OSError):
            info = {}
    if not isinstance(info, dict):
        info = {}
    if info.get("kind") in RUN_KINDS:
        return info["kind"]
    for kind, spec in RUN_KINDS.items():
        if any((folder / m).exists() for m in spec["markers"]):
            return kind
    return next((kind for key, kind in _INFO_KEYS.items() if key in info), None)


def remove_run_files(folder: Path, kind: str) -> None:
    """Delete what a ``kind`` run wrote into ``folder`` (only those names; nothing else)."""
    import shutil

    for pattern in RUN_KINDS[kind]["files"]:
        for p in folder.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)


def claim_output(folder: Path, kind: str, *, overwrite: bool = False, flag: str = "--overwrite") -> str | None:
    """Check that a ``kind`` run may write into ``folder``; returns the kind already there (or None when empty).

    A folder that is missing or empty, or that holds a run of the same ``kind``, is accepted (the command's own
    resume rules apply next). A folder holding another kind of run, or files repbend did not write, is refused
    unless ``overwrite``: then the other run's files are removed (unknown files stay) and None is returned.
    """
    if folder.exists() and not folder.is_dir():
        raise RepbendError(f"Output {folder} is a file, not a folder; pass a folder path.")
    content = folder_contents(folder)
    if not content:
        return None
    found = run_kind(folder)
    if found == kind:
        return kind
    if found is not None:
        what = RUN_KINDS[found]["what"]
    else:
        names = ", ".join(p.name for p in content[:3]) + (", ..." if len(content) > 3 else "")
        what = f"other files, not written by repbend ({names})"
    if not overwrite:
        raise RepbendError(f"Output folder {folder} already holds {what}, not {RUN_KINDS[kind]['what']}; choose "
                           f"an empty or new folder, or pass {flag} to replace it.")
    if found is not None:
        remove_run_files(folder, found)
    return None


@contextmanager
def output_lock(folder: Path, *, enabled: bool = True) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if missing) for the ``with`` block.

    The lock is ``fcntl.flock`` on ``folder/.repbend.lock``, released when the block ends or the process dies. A
    second process asking for the same folder gets a RepbendError naming the folder and the holder. ``enabled``
    False (the non-main processes of a distributed run) takes no lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        fcntl = None
    if not enabled or fcntl is None:
        yield folder
        return
    if folder.exists() and not folder.is_dir():
        raise RepbendError(f"Output {folder} is a file, not a folder; pass a folder path.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a lock "file" planted as a symlink must not make us truncate whatever it points to
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        raise RepbendError(f"Cannot create or lock the output folder {folder} ({e.strerror}: "
                           f"{e.filename or folder}); choose a folder you can write to (and remove a "
                           f"{LOCK_FILE} that is not a plain file).") from None
    f = os.fdopen(fd, "r+", encoding="utf-8", errors="replace")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = " ".join(f.read().split())[:200] or "another process"
            raise RepbendError(f"Output folder {folder} is in use by another repbend run ({holder}); wait for it "
                               f"to finish or choose another output folder.") from None
        except OSError as e:  # a file system without locks (some network mounts): go on, say so
            print(f"repbend: cannot lock {folder} ({e.strerror}); make sure no other run writes there",
                  file=sys.stderr, flush=True)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {platform.node()} since "
                f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}: {' '.join(sys.argv[:4])}\n")
        f.flush()
        yield folder
    finally:
        f.close()  # closing the file releases the lock
