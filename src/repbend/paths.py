"""Where shipped configs live, and how a config name resolves to a file.

A config argument may be a path to a YAML file or a bare name: ``quick`` (suite), ``train-default``,
``data-default``. Bare names are looked up in ``<checkout>/configs[/<sub>]/<name>.yaml``.
"""
from __future__ import annotations

from pathlib import Path

from repbend.errors import RepbendError

_HERE = Path(__file__).resolve()
# source checkout: <repo>/configs ; installed wheel: repbend/configs (package data)
CONFIG_DIR = next((d for d in (_HERE.parents[2] / "configs", _HERE.parent / "configs") if d.is_dir()),
                  _HERE.parents[2] / "configs")


def resolve_config(name: str | Path, sub: str = "") -> Path:
    """Return the YAML file for ``name`` (a path, ``~`` expanded, or a name under ``configs/<sub>``)."""
    p = Path(name).expanduser()
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise RepbendError(f"Config file {p} does not exist; pass an existing YAML file or a name from {CONFIG_DIR}.")
        return p
    cand = CONFIG_DIR / sub / f"{name}.yaml"
    if cand.is_file():
        return cand
    avail = sorted(q.stem for q in (CONFIG_DIR / sub).glob("*.yaml")) if (CONFIG_DIR / sub).is_dir() else []
    raise RepbendError(f"No config named {str(name)!r} in {CONFIG_DIR / sub}; available: {', '.join(avail) or 'none'}.")
