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


def _list_entry(node: list, part: str, item: str, where: str) -> int:
    """Index of a list entry named by position (``0``) or by its unique ``label``/``name`` (``attacks.gcg``)."""
    if part.isdigit():
        if int(part) >= len(node):
            raise ConfigError(f"Override {item!r}: {where} is a list of {len(node)}; index it with 0.."
                              f"{len(node) - 1} or an entry's label.")
        return int(part)
    hits = [i for i, x in enumerate(node) if isinstance(x, dict) and part in (x.get("label"), x.get("name"))]
    if len(hits) != 1:
        raise ConfigError(f"Override {item!r}: {part!r} matches {len(hits)} entries; use the list index or a "
                          f"unique label.")
    return hits[0]


def set_value(data: dict[str, Any], key: str, value: Any, item: str | None = None) -> None:
    """Set ``dotted.key`` in ``data`` (in place) to ``value`` as it is (no parsing); missing sections are made.

    A part that meets a list selects an entry by index or by its ``label``/``name``: ``attacks.gcg.steps``.
    """
    item = item or key
    node: Any = data
    parts = key.strip().split(".")
    if not key.strip() or not all(parts):
        raise ConfigError(f"Override {item!r} must look like section.field=value (e.g. training.max_steps=10).")
    for i, part in enumerate(parts):
        last, where = i == len(parts) - 1, ".".join(parts[:i]) or "<root>"
        if isinstance(node, list):
            idx: Any = _list_entry(node, part, item, where)
        elif isinstance(node, dict):
            idx = part
        else:
            raise ConfigError(f"Override {item!r}: {where} is a value, not a section.")
        if last:
            node[idx] = value
        elif isinstance(node, list):
            node = node[idx]
        else:
            node = node.setdefault(idx, {})


def set_values(data: dict[str, Any], values: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of ``data`` with typed ``{dotted.key: value}`` set (what code sets; users write overrides)."""
    out = copy.deepcopy(data)
    for key, value in (values or {}).items():
        set_value(out, key, copy.deepcopy(value))
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides; values are parsed as YAML (``3``, ``[1,2]``, ``null``).

    The one parser of user overrides for every config kind. A numeric part indexes a list that is already
    there (``harmful.0.max_rows=50``); another part picks the list entry with that ``label`` or ``name``
    (``attacks.gcg.steps=5``).
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
        set_value(out, key, value, item)
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
                data: dict[str, Any] | None = None, values: dict[str, Any] | None = None) -> C:
    """Load ``cls`` from a YAML file (or ``data``), user ``overrides`` (parsed) and then typed ``values``
    (``{dotted.key: value}``, set as they are); raise ConfigError listing every problem."""
    raw = dict(data or {})
    if path is not None:
        raw = {**read_yaml(path), **raw}
    raw = set_values(apply_overrides(raw, overrides), values)
    cfg, errors = validate_data(cls, raw)
    if errors:
        where = f" in {path}" if path else ""
        raise ConfigError(f"Invalid config{where}: " + "; ".join(errors))
    assert cfg is not None
    return cfg


def saved_dump(cfg: BaseModel) -> dict:
    """The resolved config as the dict :func:`dump_config` writes. A config class leaves out sections that do not
    apply (``dump_exclude()``, e.g. ``lora`` of a full fine-tuning run)."""
    exclude = cfg.dump_exclude() if hasattr(cfg, "dump_exclude") else None
    return cfg.model_dump(mode="json", exclude=exclude)


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML that :func:`load_config` reads back into the same config (:func:`saved_dump`)."""
    return yaml.safe_dump(saved_dump(cfg), sort_keys=False)
