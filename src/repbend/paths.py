"""Where shipped configs live, and how a config name resolves to a file.

A config argument may be a path to a YAML file or a bare name: ``quick`` (suite), ``train-default``,
``data-default``. Bare names are looked up in ``repbend/configs[/<sub>]/<name>.yaml``, which ships in the wheel.
"""
from __future__ import annotations

from pathlib import Path

from repbend.errors import ConfigError

# Shipped inside the package (a source checkout's top-level ``configs`` is a link to this folder).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def shipped_names(sub: str = "") -> list[str]:
    """Names of the shipped configs under ``configs/<sub>``."""
    d = CONFIG_DIR / sub
    return sorted(q.stem for q in d.glob("*.yaml")) if d.is_dir() else []


def resolve_config(name: str | Path, sub: str = "", kind: str = "config") -> Path:
    """Return the YAML file for ``name``: a path to a file, or a name under ``configs/<sub>``.

    The one resolver for every config kind (train, data, pipeline, sweep: ``sub=""``; suites: ``"suites"``).
    """
    p = Path(name).expanduser()
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ConfigError(f"Config file {p} does not exist; pass an existing YAML file or a name from {CONFIG_DIR}.")
        return p
    cand = CONFIG_DIR / sub / f"{name}.yaml"
    if cand.is_file():
        return cand
    raise ConfigError(f"Unknown {kind} {str(name)!r} (no {cand.name} in {CONFIG_DIR / sub}); pass one of "
                       f"{', '.join(shipped_names(sub)) or 'none'} or a path to a .yaml file.")
