"""``repbend validate``: every problem of any config file at once, without loading a model.

Each config kind names its class, the top-level keys that identify a file of that kind, and optionally a
check beyond the schema (referenced files, other configs a pipeline or sweep names, registry entries).
Areas that add a kind call :func:`register_config_kind`. A config argument may be a path or a shipped name
(``train-default``, ``pipeline-quick``, ``tune-default``, ``data-default``, or a suite: ``quick``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repbend.errors import ConfigError, RepbendError


@dataclass(frozen=True)
class ConfigKind:
    target: str                  # "module:Class" of the config
    keys: frozenset[str]         # top-level keys that only this kind has
    check: str | None = None     # "module:function" (cfg) -> list of error lines, run when the schema holds
    sub: str = ""                # where shipped files of this kind live under configs/
    defaults: bool = False       # the file holds only changes to the class's defaults (data build configs)


CONFIG_KINDS: dict[str, ConfigKind] = {
    "train": ConfigKind("repbend.training.config:TrainConfig", frozenset({"method", "lora", "full_finetune", "training"}),
                        "repbend.training.config:check_train_config"),
    "data": ConfigKind("repbend.data.build_config:DataBuildConfig",
                       frozenset({"harmful", "benign", "refusals", "decontam", "val_fraction", "keep_model_refusals"}),
                       defaults=True),
    "suite": ConfigKind("repbend.evaluation.suites:Suite", frozenset({"benchmarks", "attacks", "judge", "over_refusal"}),
                        "repbend.evaluation.suites:check_suite", sub="suites"),
    "pipeline": ConfigKind("repbend.pipeline.jobs:PipelineConfig", frozenset({"methods", "data_config"}),
                           "repbend.validate:check_pipeline"),
    "sweep": ConfigKind("repbend.pipeline.tune.config:SweepConfig",
                        frozenset({"grid", "trials", "select", "baseline", "eval_dtype"}), "repbend.validate:check_sweep"),
}


def register_config_kind(name: str, target: str, keys: set[str], check: str | None = None, sub: str = "") -> None:
    """Let ``repbend validate`` check another config kind (detected by any of ``keys`` at the top level)."""
    CONFIG_KINDS[name] = ConfigKind(target, frozenset(keys), check, sub)


def _attr(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def _errors_of(fn: Any, *args: Any) -> list[str]:
    try:
        return list(fn(*args))
    except RepbendError as e:
        return [str(e)]


def check_pipeline(cfg: Any) -> list[str]:
    """Every config the pipeline names (data, train per method, suite) resolves and validates."""
    from repbend.pipeline.jobs import plan

    return _errors_of(lambda c: (plan(c), [])[1], cfg)


def check_sweep(cfg: Any) -> list[str]:
    """Every trial's train config and the suite validate."""
    from repbend.pipeline.tune.trials import check

    return _errors_of(lambda c: (check(c, Path("runs/tune")), [])[1], cfg)


def _find(config: str | Path, kind: str | None) -> Path:
    from repbend.paths import resolve_config

    if kind is not None and kind in CONFIG_KINDS:
        return resolve_config(config, CONFIG_KINDS[kind].sub, kind=f"{kind} config")
    try:
        return resolve_config(config)
    except ConfigError:
        for k in CONFIG_KINDS.values():     # a shipped name in a sub-folder (suites)
            if k.sub:
                try:
                    return resolve_config(config, k.sub)
                except ConfigError:
                    pass
        raise


def validate_config(config: str | Path, overrides: list[str] | None = None,
                    kind: str | None = None) -> tuple[str, list[str]]:
    """Every problem of a config file (path or shipped name) at once: returns (kind, error lines)."""
    from repbend.config import apply_overrides, read_yaml, validate_data

    if kind is not None and kind not in CONFIG_KINDS:
        raise ConfigError(f"Unknown config kind {kind!r}; use one of {', '.join(CONFIG_KINDS)}.")
    path = _find(config, kind)
    data = read_yaml(path)
    if kind is None:
        found = [k for k, spec in CONFIG_KINDS.items() if spec.keys & set(data)]
        if len(found) != 1:
            raise ConfigError(f"Cannot tell which kind of config {path} is ({found or 'no match'}); pass --kind "
                              f"({', '.join(CONFIG_KINDS)}).")
        kind = found[0]
    spec = CONFIG_KINDS[kind]
    cls = _attr(spec.target)
    if spec.defaults:
        data = {**cls().model_dump(mode="json"), **data}
    data = apply_overrides(data, overrides)
    try:
        cfg, errors = validate_data(cls, data)
    except RepbendError as e:  # e.g. an unknown method name raised inside a validator
        return kind, [str(e)]
    if cfg is not None and spec.check:
        errors = _errors_of(_attr(spec.check), cfg)
    return kind, errors
