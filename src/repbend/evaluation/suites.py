"""Evaluation suites: YAML files saying which benchmarks, attacks, judge, settings to use.

A suite is a :class:`Suite` (unknown keys are errors). Benchmarks, attacks and the judge are written
as ``{name: <registry name>, <fields of that class's Config>}`` and may carry a ``label`` (the key
used in results; default: the name) so one attack can run twice with different budgets. An attack
may also carry ``n_behaviours``: run it on a seeded, category-stratified subset of that many of each
benchmark's behaviours (for expensive white-box attacks on a CPU)::

    benchmarks:
      - {name: harmbench, n: 32, seed: 0}
    attacks:
      - {name: direct}
      - {name: templates, n_templates: 4}
      - {name: gcg, label: gcg_small, preset: cpu, n_behaviours: 8}
    judge: {name: default}

``load_suite("quick" | "full" | path, overrides)`` reads ``configs/suites/<name>.yaml`` (shipped with
the package) or the file, applies ``a.b=value`` overrides (list entries by index or label:
``attacks.gcg.steps=5``), and validates everything — including each
attack's/benchmark's/judge's own Config — reporting every problem at once with its field path
(``attacks[2] (templates).n_templates: ...``).
"""
from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from repbend.config import Section, apply_overrides, read_yaml, validate_data
from repbend.errors import ConfigError, RepbendError
from repbend.evaluation.attacks.base import GENERIC_TARGET
from repbend.evaluation.overrefusal import OverRefusalConfig
from repbend.evaluation.types import GenSettings
from repbend.paths import resolve_config
from repbend.registry import Registry


class GenerationConfig(Section):
    max_new_tokens: int = Field(64, ge=1, description="New tokens per answer.")
    batch_size: int = Field(8, ge=1, description="Conversations per generation batch (left padding, KV cache).")
    group: int = Field(4, ge=1, description="Batches handed to the generator per call: its batching by length sees "
                                            "that many batches' requests at once (answers are stored per batch).")
    pool: bool = Field(True, description="Generate the answers of every black-box attack and the over-refusal sets "
                                         "before the attacks run, in one generator call per generation settings (they "
                                         "depend on the behaviours only); false: each attack's own calls.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding (attacks like best_of_n override).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (when do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus threshold (when do_sample).")
    seed: int = Field(0, description="Sampling seed.")

    def settings(self) -> GenSettings:
        return GenSettings(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                           temperature=self.temperature, top_p=self.top_p, num_samples=1, seed=self.seed)


def _check_named(v: list[dict] | dict, what: str) -> Any:
    items = v if isinstance(v, list) else [v]
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError(f"{what} entry {i} must be a mapping with a 'name' (e.g. {{name: direct}})")
    return v


class Suite(Section):
    name: str = Field("custom", description="Suite name recorded in results.")
    description: str = Field("", description="What this suite is for.")
    seed: int = Field(0, description="Global seed (data order, sampling).")
    benchmarks: list[dict] = Field(..., min_length=1, description="Benchmarks: {name, label?, <Config fields>}.")
    attacks: list[dict] = Field(..., min_length=1, description="Attacks: {name, label?, <Config fields>}.")
    judge: dict = Field(default_factory=lambda: {"name": "default"}, description="Judge: {name, <Config fields>}.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Generation settings.")
    allow_generic_target: bool = Field(False, description="Let target-based attacks use a generic affirmative "
                                                          "opening on benchmarks without targets (HarmBench).")
    generic_target: str = Field(GENERIC_TARGET, min_length=1, description="The generic affirmative opening.")
    over_refusal: OverRefusalConfig = Field(default_factory=OverRefusalConfig, description="Over-refusal sets.")
    capability: dict | None = Field(None, description="Capability settings (repbend.evaluation.capability); "
                                                      "null = skip.")

    @field_validator("benchmarks", "attacks", "judge")
    @classmethod
    def _named(cls, v: Any, info: Any) -> Any:
        return _check_named(v, info.field_name)


RUNNER_KEYS = ("name", "label", "n_behaviours")   # read by the runner, not passed to the class's Config


def split_spec(spec: dict) -> tuple[str, str, dict]:
    """``{name, label?, n_behaviours?, **fields}`` -> (name, label, fields)."""
    fields = {k: v for k, v in spec.items() if k not in RUNNER_KEYS}
    return spec["name"], str(spec.get("label") or spec["name"]), fields


def build(registry: Registry, spec: dict) -> tuple[str, Any]:
    """Instantiate ``registry[spec.name](Config(**fields))``; returns (label, object)."""
    name, label, fields = split_spec(spec)
    cls = registry.get(name)
    cfg, errors = validate_data(cls.Config, fields)
    if errors:
        raise ConfigError(f"{registry.kind} {label!r}: " + "; ".join(errors))
    return label, cls(cfg)


def check_suite(suite: Suite) -> list[str]:
    """Every problem in the named parts (names, labels, Config fields) as one-line messages."""
    from repbend.evaluation.attacks import ATTACKS
    from repbend.evaluation.benchmarks import BENCHMARKS
    from repbend.evaluation.judges import JUDGES

    problems: list[str] = []
    groups = [("benchmarks", BENCHMARKS, suite.benchmarks), ("attacks", ATTACKS, suite.attacks),
              ("judge", JUDGES, [suite.judge])]
    for field, registry, specs in groups:
        labels: set[str] = set()
        for i, spec in enumerate(specs):
            name, label, fields = split_spec(spec)
            where = f"{field}[{i}] ({name})" if field != "judge" else f"judge ({name})"
            nb = spec.get("n_behaviours")
            if nb is not None and (field != "attacks" or not isinstance(nb, int) or isinstance(nb, bool) or nb < 1):
                problems.append(f"{where}.n_behaviours: must be a positive integer, and only on attacks")
            if label in labels:
                problems.append(f"{where}.label: {label!r} is used twice; give one of them a different label")
            labels.add(label)
            try:
                cls = registry.get(name)
            except RepbendError as e:
                problems.append(f"{where}.name: {e}")
                continue
            _, errors = validate_data(cls.Config, fields)
            problems += [f"{where}.{e}" for e in errors]
    if suite.capability is not None:
        from repbend.evaluation.capability import CapabilityConfig

        problems += [f"capability.{e}" for e in validate_data(CapabilityConfig, suite.capability)[1]]
    return problems


def load_suite(spec: str, overrides: list[str] | None = None) -> Suite:
    """Load and fully validate a suite (shipped name or YAML path) with ``a.b=value`` overrides."""
    path = resolve_config(spec, "suites", kind="suite")
    data = apply_overrides(read_yaml(path), overrides)
    data.setdefault("name", path.stem)
    suite, errors = validate_data(Suite, data)
    if suite is not None:
        errors = check_suite(suite)
    if errors:
        raise ConfigError(f"Invalid suite {path}: " + "; ".join(errors))
    return suite
