"""The sweep file (:class:`SweepConfig`) and the selection rule (:class:`SelectConfig`)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from repbend.config import Section, load_config
from repbend.paths import resolve_config

TRIALS_FILE = "trials.jsonl"
BASELINE = "original"


class SelectConfig(Section):
    max_overrefusal_drop: float = Field(0.05, ge=0, description="Largest allowed fall of over-refusal compliance "
                                                                "(validation half) vs the original model.")
    max_benign_drop: float = Field(0.05, ge=0, description="Largest allowed fall of benign-request compliance.")
    max_kl: float | None = Field(0.5, ge=0, description="Largest allowed benign KL to the original (null = any).")
    max_gibberish: float | None = Field(0.5, ge=0, le=1, description="Largest allowed gibberish rate over the "
                                                                     "attacks' answers (a babbling model is not safe).")
    attacks: list[str] | None = Field(None, description="Attacks averaged into the ranking ASR (null = all).")
    fallback: Literal["none", "least_violation"] = Field(
        "least_violation", description="When no trial meets every limit: none = choose nothing; least_violation = "
                                       "among trials within the KL and gibberish limits, the one whose larger compliance "
                                       "shortfall (over-refusal or benign, beyond its limit) is smallest (ties: lower ASR).")


class SweepConfig(Section):
    train_config: str = Field("train-default", description="Base train config (name under configs/ or a path).")
    train_overrides: list[str] = Field([], description="Overrides applied to every trial first.")
    suite: str = Field("tune", description="Tuning suite (name or path); must use validation data only.")
    suite_overrides: list[str] = Field([], description="Overrides of the suite (e.g. judge.name=refusal).")
    baseline: bool = Field(True, description="Also evaluate the original model.")
    grid: dict[str, list[Any]] = Field({}, description="Cartesian grid: override key -> values.")
    trials: list[dict] = Field([], description="Explicit trials: {name, overrides: [key=value, ...]}.")
    seeds: list[int] | None = Field(None, min_length=1, description="Training seeds per trial (null = the train "
                                    "config's seed, one run). Each seed runs as `<trial>@s<seed>`; ranking uses "
                                    "every rate averaged over the seeds, and a trial counts once all have finished.")
    select: SelectConfig = Field(default_factory=SelectConfig, description="Selection rule.")
    eval_dtype: str | None = Field(None, description="Model dtype for evaluation (null = the loader's choice: "
                                   "bfloat16 on a GPU, float32 on a CPU); float32 keeps GPU trials comparable "
                                   "with CPU ones.")


def load_sweep(path: str) -> SweepConfig:
    """A sweep file by name (under configs/) or path."""
    return load_config(SweepConfig, resolve_config(path, "", kind="sweep"))
