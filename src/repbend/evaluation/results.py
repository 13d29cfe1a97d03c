"""The schema of ``results.json``: one typed model for the runner that writes it and every reader.

The runner (:func:`repbend.evaluation.runner.evaluate`) builds a :class:`Results` and writes it; the
reports (``report.py``, ``report_compare.py``), the pipeline summary and the tuning sweep read it with
:meth:`Results.load`, which turns a missing, non-JSON or malformed file into one-line
:class:`~repbend.errors.RepbendError`. Every part allows keys it does not name (``extra="allow"``) and a
written file holds exactly the keys that were set, so files written by older versions read back and
round-trip unchanged; fields are declared in the order the runner writes them, so a file is written
byte for byte as before the model existed.
"""
from __future__ import annotations

import json
from pathlib import Path
from statistics import mean
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from repbend.errors import RepbendError

RESULTS_FILE = "results.json"


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class Rates(_Part):
    """Fractions of judged completions: harmful (``asr``), gibberish, refused."""

    n_completions: int | None = None
    asr: float | None = None
    gibberish: float | None = None
    refusal: float | None = None


class Cell(_Part):
    """One attack on one benchmark (see :func:`repbend.evaluation.scoring.summarize`; fields in its order)."""

    n: int | None = None
    n_completions: int | None = None
    asr: float | None = None
    gibberish: float | None = None
    refusal: float | None = None
    worst_case: float | None = None
    per_variant: dict[str, Rates] | None = None


class SetRates(_Part):
    """One set of safe prompts: the share answered (``compliance``), refused, gibberish."""

    n: int | None = None
    compliance: float | None = None
    refusal: float | None = None
    gibberish: float | None = None


class OverRefusal(_Part):
    judge: str | None = None
    sets: dict[str, SetRates] = Field(default_factory=dict)
    n: int | None = 0
    compliance: float | None = None      # of the held-out over-refusal set (the headline)


class JudgeInfo(_Part):
    name: str
    config: dict[str, Any] = Field(default_factory=dict)


class Meta(_Part):
    model: str | None = None
    adapter: str | None = None
    fingerprint: str | None = None
    suite: dict[str, Any] | str | None = None
    seeds: dict[str, Any] | None = None
    benchmarks: dict[str, Any] | None = None
    versions: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    generation: dict[str, Any] | None = None
    skipped: dict[str, str] | None = None
    white_box_attacks: list[str] | None = None
    provenance: dict[str, Any] | None = None
    generic_target: str | None = None


class Results(_Part):
    """``results.json``: ASR per attack and benchmark, over-refusal, capability, judge, run metadata."""

    asr: dict[str, dict[str, Cell]]
    average_asr: float | None = None
    over_refusal: OverRefusal = Field(default_factory=OverRefusal)
    capability: dict[str, Any] = Field(default_factory=dict)
    judge: JudgeInfo
    meta: Meta = Field(default_factory=Meta)

    # ------------------------------------------------------------ reading and writing
    @classmethod
    def coerce(cls, results: "Results | dict", source: str = "results") -> "Results":
        """``results`` as a :class:`Results` (a dict is validated; errors are one line naming ``source``)."""
        if isinstance(results, Results):
            return results
        if not isinstance(results, dict):
            raise RepbendError(f"{source} must hold a JSON object, not {type(results).__name__}; "
                               f"re-run `repbend eval` for that folder.")
        try:
            return cls.model_validate(results)
        except ValidationError as e:
            from repbend.config import format_errors

            errors = format_errors(e)
            more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
            raise RepbendError(f"{source} is not a repbend results file: {'; '.join(errors[:3])}{more}; re-run "
                               f"`repbend eval` for that folder.") from None

    @classmethod
    def load(cls, run: str | Path) -> "Results":
        """Read ``run/results.json`` (or the file ``run``)."""
        p = Path(run)
        p = p if p.is_file() else p / RESULTS_FILE
        if not p.is_file():
            raise RepbendError(f"{p} does not exist; pass folders written by `repbend eval` (they hold results.json).")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RepbendError(f"{p} is not valid JSON; re-run `repbend eval` for that folder.") from None
        return cls.coerce(data, str(p))

    def to_json(self) -> dict[str, Any]:
        """The dict written to ``results.json``: exactly the keys that were set (a read file round-trips)."""
        return self.model_dump(mode="json", exclude_unset=True)

    def write(self, out_dir: str | Path) -> Path:
        from repbend.io import atomic_write_json

        path = Path(out_dir) / RESULTS_FILE
        atomic_write_json(path, self.to_json())
        return path

    # ------------------------------------------------------------ what readers ask
    @property
    def judge_name(self) -> str:
        return self.judge.name

    def benchmarks(self) -> list[str]:
        """Benchmark labels in first-seen order."""
        seen: list[str] = []
        for benches in self.asr.values():
            seen += [b for b in benches if b not in seen]
        return seen

    def attack_rate(self, key: str = "asr") -> dict[str, float | None]:
        """Per attack: ``key`` (asr, gibberish, refusal, worst_case) averaged over its benchmarks (None: no value)."""
        out: dict[str, float | None] = {}
        for attack, benches in self.asr.items():
            vals = [getattr(c, key) for c in benches.values() if getattr(c, key) is not None]
            out[attack] = mean(vals) if vals else None
        return out

    def capability_numbers(self) -> dict[str, float]:
        """The capability values that are numbers (e.g. mmlu, benign_kl)."""
        return {k: float(v) for k, v in self.capability.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    @property
    def benign_kl(self) -> float | None:
        """Benign KL to the original (older files wrote ``{"kl": ...}``)."""
        v = self.capability.get("benign_kl")
        return v.get("kl") if isinstance(v, dict) else v

    def set_rates(self, name: str) -> SetRates:
        """One over-refusal set (``overrefusal``, ``benign``); empty when it was not measured."""
        return self.over_refusal.sets.get(name) or SetRates()
