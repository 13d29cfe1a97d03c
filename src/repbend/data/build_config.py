"""Configuration of ``repbend data build`` (defaults = configs/data-default.yaml)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from repbend.config import Section, format_errors
from repbend.data.decontam import DecontamConfig


class SourceSpec(Section):
    """One source to read: a registered name, its options (checked by the source's Config), a row cap."""

    source: str = Field(..., description="Registered data source name (repbend data sources lists them).")
    options: dict[str, Any] = Field(default_factory=dict, description="Options of that source (its Config fields).")
    max_rows: int | None = Field(None, ge=1, description="Keep at most this many rows (seeded sample, after "
                                                         "decontamination).")

    @model_validator(mode="after")
    def _check_source(self) -> "SourceSpec":
        from pydantic import ValidationError

        from repbend.data.sources import SOURCES
        from repbend.errors import RepbendError
        try:
            cls = SOURCES.get(self.source)
        except RepbendError as e:  # did-you-mean message, reported with the other config errors
            raise ValueError(str(e)) from None
        try:
            cls.Config.model_validate(self.options)
        except ValidationError as e:
            raise ValueError(f"options of source {self.source!r}: " + "; ".join(format_errors(e))) from None
        return self

    def build(self):
        from repbend.data.sources import SOURCES
        cls = SOURCES.get(self.source)
        return cls(cls.Config.model_validate(self.options))


class GenerationSettings(Section):
    batch_size: int = Field(64, ge=1, description="Prompts generated together (left-padded batch).")
    max_new_tokens_harmful: int = Field(64, ge=1, description="Answer length for harmful requests (the UNSAFE "
                                                              "responses).")
    max_new_tokens_benign: int = Field(96, ge=1, description="Answer length for benign and over-refusal prompts "
                                                             "(SAFE/RETAIN responses).")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding (seeded).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (with do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (with do_sample).")


class Draws(Section):
    """The rows one training run draws per split: its seed and ``steps x grad_accum x batch size`` (rounded up to
    whole length-bucketing windows), and its ``data.repeat_kinds``."""

    seed: int = Field(0, description="The run's training.seed (its draw order).")
    safe: int = Field(0, ge=0, description="SAFE rows drawn.")
    unsafe: int = Field(0, ge=0, description="UNSAFE rows drawn.")
    retain: int = Field(0, ge=0, description="RETAIN rows drawn.")
    repeat_kinds: dict[str, int] = Field(default_factory=dict, description="The run's data.repeat_kinds.")


class RowBudget(Section):
    """The draws of the training runs a build serves; the build answers only the requests whose rows they take."""

    draws: list[Draws] = Field(default_factory=list, description="One entry per training run (seed, rows per split).")
    margin: float = Field(0.1, ge=0, description="Extra share of rows covered beyond the draws (a somewhat longer run "
                                                 "still draws what a whole-pool build would give it).")
    window: int = Field(64, ge=1, description="Requests answered at a time (at least one generation batch): the "
                                              "budget's granularity.")
    val_retain: int | None = Field(None, ge=0, description="Validation: null answers every held-out request; N "
                                   "answers only the held-out benign requests that give the first N val retain rows "
                                   "(what an evaluation's benign KL reads), in the order a whole build writes them; "
                                   "held-out harmful requests then keep only their project-written refusal.")


def _spec(source: str, max_rows: int | None = None, **options: Any) -> SourceSpec:
    return SourceSpec(source=source, options=options, max_rows=max_rows)


DNA_DEFAULT = ["malicious_uses", "information_hazard", "discrimination_exclusion_toxicity_hateful_offensive"]


class DataBuildConfig(Section):
    model: str = Field("default", description="The model to be defended (alias, folder or hub id); it answers the "
                                              "requests on-policy.")
    seed: int = Field(0, description="Seed for sampling rows, refusal texts, the validation split and generation.")
    harmful: list[SourceSpec] = Field(
        default_factory=lambda: [_spec("advbench", 200), _spec("donotanswer", 200, files=DNA_DEFAULT)],
        description="Harmful training requests (answered by the model -> UNSAFE; paired with a SAFE refusal).")
    benign: list[SourceSpec] = Field(
        default_factory=lambda: [_spec("project", file="benign"), _spec("project", file="overrefusal", split="train")],
        description="Benign training requests (answered by the model -> SAFE and RETAIN).")
    refusals: list[SourceSpec] = Field(
        default_factory=lambda: [_spec("project", file="refusals")],
        description="Refusal texts used as the SAFE answer to every harmful request (rows need a response).")
    evaluation: list[SourceSpec] = Field(
        default_factory=lambda: [_spec("harmbench", split="test", include_copyright=True),
                                 _spec("harmbench", split="val", include_copyright=True), _spec("jbb"),
                                 _spec("strongreject"), _spec("project", file="overrefusal", split="eval"),
                                 _spec("project", file="overrefusal", split="val")],
        description="Evaluation prompts no training request may match (decontamination).")
    decontam: DecontamConfig = Field(default_factory=DecontamConfig, description="Near-duplicate thresholds.")
    generation: GenerationSettings = Field(default_factory=GenerationSettings, description="How the model answers.")
    max_request_tokens: int = Field(384, ge=8, description="Longer requests are truncated (counted in the manifest).")
    max_response_tokens: int = Field(256, ge=8, description="Longer responses are truncated (counted in the manifest).")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Share of requests held out in val.jsonl.")
    rows_needed: RowBudget | None = Field(
        None, description="Answer only the training requests whose rows these draws (plus the margin) take, in the "
                          "trainer's draw order, and every validation request; null = answer every request. "
                          "`repbend demo` / `compare` set it from their training configs.")
    keep_model_refusals: bool = Field(True, description="Keep the model's own refusals of harmful requests as extra "
                                                        "SAFE rows.")

    @field_validator("refusals")
    @classmethod
    def _need_refusals(cls, v: list[SourceSpec]) -> list[SourceSpec]:
        if not v:
            raise ValueError("at least one refusal source is needed (the SAFE answers to harmful requests)")
        return v


def load_build_config(path: str | None = None, overrides: list[str] | None = None) -> DataBuildConfig:
    """Defaults, then the YAML file's top-level keys, then overrides; every error reported at once."""
    from repbend.config import apply_overrides, load_config, read_yaml

    data = DataBuildConfig().model_dump(mode="json")
    if path:
        data.update(read_yaml(path))
    return load_config(DataBuildConfig, data=apply_overrides(data, overrides))
