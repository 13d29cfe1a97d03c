"""A sweep's trials: expansion of the grid and the explicit list, each trial's train config, reuse checks."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from repbend.config import apply_overrides, load_config, read_yaml
from repbend.errors import ConfigError, RepbendError
from repbend.paths import resolve_config
from repbend.pipeline.tune.config import BASELINE, SweepConfig


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def expand(cfg: SweepConfig) -> list[dict]:
    """The trials, the grid's product first, then the explicit trials; each a dict with ``name``, ``slug`` (its
    folder), ``overrides`` (as recorded), ``args`` (user overrides to parse) and ``values`` (typed settings:
    grid values, the seed), plus ``base``/``seed`` per seed and ``reuse`` where given."""
    out: list[dict] = []
    keys = list(cfg.grid)
    for values in itertools.product(*(cfg.grid[k] for k in keys)) if keys else []:
        name = "_".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in zip(keys, values))
        out.append({"name": name, "overrides": [f"{k}={v}" for k, v in zip(keys, values)], "args": [],
                    "values": dict(zip(keys, values))})
    for i, t in enumerate(cfg.trials):
        if not isinstance(t, dict) or not t.get("name") or not isinstance(t.get("overrides", []), list):
            raise ConfigError(f"trials[{i}]: write it as {{name: ..., overrides: [key=value, ...]}}")
        if not isinstance(t.get("reuse", ""), str):
            raise ConfigError(f"trials[{i}].reuse: give a folder path (may contain {{seed}})")
        args = [str(o) for o in t.get("overrides", [])]
        out.append({"name": str(t["name"]), "overrides": args, "args": args, "values": {},
                    **({"reuse": t["reuse"]} if t.get("reuse") else {})})
    names = [t["name"] for t in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup or BASELINE in names:
        raise ConfigError(f"trial names must be unique and not {BASELINE!r}: {dup or [BASELINE]}")
    if not out:
        raise ConfigError("the sweep has no trials: give a grid or a list of trials")
    if cfg.seeds is not None:
        if len(set(cfg.seeds)) != len(cfg.seeds):
            raise ConfigError(f"seeds must be unique: {cfg.seeds}")
        out = [{**t, "name": f"{t['name']}@s{sd}", "overrides": [*t["overrides"], f"training.seed={sd}"],
                "values": {**t["values"], "training.seed": sd}, "base": t["name"], "seed": sd}
               for t in out for sd in cfg.seeds]
    for t in out:
        t["slug"] = trial_slug(t["name"])
    folders: dict[str, str] = {BASELINE: BASELINE}
    for t in out:
        other = folders.setdefault(t["slug"].lower(), t["name"])
        if other != t["name"]:
            raise ConfigError(f"trial names {other!r} and {t['name']!r} map to the same folder {t['slug']!r}; "
                              f"rename one of them")
    return out


def trial_slug(name: str) -> str:
    """The folder name of a trial under the sweep's output folder: letters, digits and ``=.-_`` kept, the
    rest ``_``; a name that would not be a plain sub-folder (``..``, ``.x``, no letter or digit) is an error."""
    slug = "".join(c if c.isalnum() or c in "=.-_" else "_" for c in name)
    if slug.startswith(".") or not any(c.isalnum() for c in slug):
        raise ConfigError(f"trial name {name!r} cannot name a folder inside the output folder; start it with a "
                          f"letter or digit (e.g. lr_high)")
    return slug


def train_config(sweep: SweepConfig, trial: dict, out: Path):
    """The trial's TrainConfig: base config, the sweep's and the trial's overrides, its typed values, its folder."""
    from repbend.training import TrainConfig

    raw = apply_overrides(read_yaml(resolve_config(sweep.train_config)),
                          [*sweep.train_overrides, *trial.get("args", [])])
    return load_config(TrainConfig, data=raw,
                       values={**trial.get("values", {}), "output_dir": str(out / trial["slug"] / "train")})


def check(sweep: SweepConfig, out: Path) -> list[dict]:
    """Validate every trial's train config and the suite before anything heavy runs."""
    from repbend.evaluation.suites import load_suite

    trials = expand(sweep)
    load_suite(sweep.suite, list(sweep.suite_overrides))
    for t in trials:
        try:
            train_config(sweep, t, out)
        except ConfigError as e:
            raise ConfigError(f"trial {t['name']!r}: {e}") from None
    return trials


def final_train_metrics(run_dir: Path) -> dict:
    """The last row of a training run's metrics.csv (empty when there is none)."""
    import csv

    path = run_dir / "metrics.csv"
    if not path.is_file():
        return {}
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return {k: float(v) for k, v in rows[-1].items() if v not in ("", None)} if rows else {}


def reusable_run(tcfg, folder: str) -> Path:
    """Check that the finished training run in ``folder`` is what ``tcfg`` would train; return its path.

    A trial may name such a run (``reuse:``, e.g. a demo's ``train-repbend-s{seed}``) instead of training
    again: training is deterministic for a seed, so this only saves the time. Everything that shapes the
    weights must match (:data:`~repbend.training.checkpoint.MUST_MATCH`, ``max_steps``); the data folder
    may live elsewhere but its ``train.jsonl`` must be byte-identical. RepbendError otherwise.
    """
    from repbend.io import sha256_file
    from repbend.training import TrainConfig
    from repbend.training.checkpoint import MUST_MATCH, config_diff

    run = Path(folder)
    if not (run / "config.yaml").is_file() or not (run / "metrics.csv").is_file():
        raise RepbendError(f"reuse: {run} holds no training run (config.yaml and metrics.csv missing).")
    old = load_config(TrainConfig, data=read_yaml(run / "config.yaml")).model_dump(mode="json")
    new = tcfg.model_dump(mode="json")
    diff = config_diff(old, new, tuple(k for k in (*MUST_MATCH, "training.max_steps") if k != "data.dir"))
    if diff:
        raise RepbendError(f"reuse: {run} was trained with other settings ({', '.join(diff)}); train the trial "
                           f"instead (drop reuse) or point reuse at a matching run.")
    a, b = Path(old["data"]["dir"]) / "train.jsonl", Path(new["data"]["dir"]) / "train.jsonl"
    if not a.is_file() or not b.is_file() or sha256_file(a) != sha256_file(b):
        raise RepbendError(f"reuse: {run} was trained on {a}, which is not byte-identical to {b}.")
    last = final_train_metrics(run).get("step")
    if last != tcfg.training.max_steps:
        raise RepbendError(f"reuse: {run} stopped at step {last}, not {tcfg.training.max_steps}; finish it first.")
    return run


def seed_ident(trial: dict) -> dict:
    """``base``/``seed`` of a per-seed trial (empty for single-seed trials and the original)."""
    return {k: trial[k] for k in ("base", "seed") if k in trial}
