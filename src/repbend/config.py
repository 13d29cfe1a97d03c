"""Configuration: pydantic models loaded from YAML plus ``a.b=value`` overrides.

Every config section is a :class:`Section` (a pydantic model that forbids unknown keys). Loading
collects *all* validation errors; :func:`load_config` raises one :class:`ConfigError` whose message
lists each bad field on one line (``field.path: problem``), and ``repbend validate`` prints them all.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from repbend.errors import ConfigError

C = TypeVar("C", bound=BaseModel)


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated, and no float
    may be infinite or NaN (``lr: .inf`` is an error, not a run that diverges at step 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Config file {p} does not exist; pass an existing YAML file (see configs/).")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"Config file {p} is not UTF-8 text (byte {e.start}); pass a YAML file.") from None
    except OSError as e:
        raise ConfigError(f"Config file {p} cannot be read ({e.strerror}); check the path and its permissions.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"Config file {p} is not valid YAML{where}: {getattr(e, 'problem', e)}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {p} must hold a mapping of keys to values, not {type(data).__name__}.")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides; values are parsed as YAML (``3``, ``[1,2]``, ``null``).

    A numeric part indexes a list that is already there: ``harmful.0.max_rows=50``.
    """
    out = copy.deepcopy(data)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"Override {item!r} must look like section.field=value (e.g. training.max_steps=10).")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node: Any = out
        parts = key.strip().split(".")
        for i, part in enumerate(parts):
            last, where = i == len(parts) - 1, ".".join(parts[:i]) or "<root>"
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"Override {item!r}: {where} is a list of {len(node)}; index it with 0.."
                                      f"{len(node) - 1}.")
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"Override {item!r}: {where} is a value, not a section.")
            if last:
                node[part] = value
            else:
                node = node[part] if isinstance(node, list) else node.setdefault(part, {})
    return out


def format_errors(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (remove it or check its spelling)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"{loc}: {msg}")
    return lines


def validate_data(cls: type[C], data: dict[str, Any], source: str = "config") -> tuple[C | None, list[str]]:
    """Validate without raising: returns (config or None, list of one-line error strings)."""
    try:
        return cls.model_validate(data), []
    except ValidationError as e:
        return None, format_errors(e)


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict[str, Any] | None = None) -> C:
    """Load ``cls`` from a YAML file (or ``data``) and overrides; raise ConfigError listing every problem."""
    raw = dict(data or {})
    if path is not None:
        raw = {**read_yaml(path), **raw}
    raw = apply_overrides(raw, overrides)
    cfg, errors = validate_data(cls, raw)
    if errors:
        where = f" in {path}" if path else ""
        raise ConfigError(f"Invalid config{where}: " + "; ".join(errors))
    assert cfg is not None
    return cfg


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
