"""Training configuration (``repbend train --config C``): one YAML file, every field documented.

Top-level sections: ``model``, ``data``, ``method`` (``name`` + ``params``: a discriminated union of every
registered method's typed ``Config``, validated once), ``lora``, ``full_finetune``, ``training``, ``output_dir``.
:func:`check_train_config` adds the checks that need the model's shape or the file system, still
without loading any model, so ``repbend validate`` can report every problem at once.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, ValidationError, field_serializer, field_validator, model_validator

from repbend.config import Section, format_errors
from repbend.errors import RepbendError
from repbend.layers import check_layers
from repbend.io import OptionalUserPath, UserPath

TRAIN_SPLITS = ("safe", "unsafe", "retain")


class ModelSection(Section):
    name: str = Field("default", description="Base model: hub id, local folder, or alias (default = SmolLM2-135M-Instruct).")
    adapter: OptionalUserPath = Field(None, description="Existing LoRA adapter folder to continue training (LoRA only).")
    trust_remote_code: bool = Field(False, description="Allow custom model code from the hub (only for models you trust).")


class DataSection(Section):
    dir: UserPath = Field(..., description="Built dataset folder (`repbend data build`): manifest.json + train.jsonl.")
    batch_size: dict[str, int] = Field(
        default_factory=lambda: {"safe": 4, "unsafe": 4, "retain": 4},
        description="Rows per step and process for each split (pair rows follow unsafe).")
    max_request_tokens: int = Field(512, ge=1, description="Requests are cut to their last N tokens.")
    max_response_tokens: int = Field(512, ge=1, description="Responses are cut to their first N tokens.")
    length_bucketing: bool = Field(False, description="Draw rows of similar length together (less padding).")
    bucket_batches: int = Field(16, ge=2, description="With length_bucketing: sort windows of this many batches.")
    passes: Literal["auto", "one", "by_length"] = Field(
        "auto", description="How a step's splits are run: one = all rows in ONE padded pass; by_length = splits of "
                            "similar length share a pass, each padded to its own longest row (fewer padded tokens, "
                            "more passes); auto = by_length in a single process, one under DDP/FSDP/DeepSpeed (their "
                            "wrappers expect one forward per backward).")
    paired_refusals: int = Field(
        0, ge=0, description="Refusals of the first N unsafe rows of each step (same pair_id: the same harmful "
                             "request) that join that step's safe rows, counted in batch_size.safe; the rest of the "
                             "safe rows are drawn as usual (the published batch: 8 safe = 4 drawn + 4 paired "
                             "refusals). Unsafe rows without a refusal are then left out. 0 = off.")
    response_end_of_turn: bool = Field(
        True, description="End each safe/unsafe response with the chat template's end-of-turn token (false: the "
                          "response text only, as the published data; retain rows always keep it).")
    repeat_kinds: dict[str, int] = Field(
        default_factory=dict,
        description="Oversampling: each training row of these kinds (a row's `kind` in train.jsonl: harmful, refusal, "
                    "benign, overrefusal, ...) appears N times in its split's pool, e.g. {overrefusal: 3}; a "
                    "split/kind key limits it to one split, e.g. {retain/overrefusal: 3}. Validation rows are not "
                    "repeated.")

    @field_validator("repeat_kinds")
    @classmethod
    def _repeats(cls, v: dict[str, int]) -> dict[str, int]:
        if any(n < 1 for n in v.values()):
            raise ValueError("every repeat count must be >= 1 (1 = no oversampling)")
        return v

    @field_validator("batch_size")
    @classmethod
    def _sizes(cls, v: dict[str, int]) -> dict[str, int]:
        bad = [k for k in v if k not in TRAIN_SPLITS]
        if bad:
            raise ValueError(f"unknown split(s) {bad}; use {list(TRAIN_SPLITS)} (pair rows follow unsafe)")
        if any(n < 1 for n in v.values()):
            raise ValueError("every batch size must be >= 1")
        return v

    @model_validator(mode="after")
    def _paired(self) -> "DataSection":
        k = self.paired_refusals
        for split in ("safe", "unsafe"):
            if k > self.batch_size.get(split, 4):
                raise ValueError(f"paired_refusals: {k} refusals per step do not fit batch_size.{split} "
                                 f"{self.batch_size.get(split, 4)}; lower paired_refusals or raise that batch size")
        return self


def method_class(name: str):
    """The registered method class (RepbendError with did-you-mean when unknown or not importable)."""
    from repbend.methods import METHODS

    try:
        return METHODS.get(name)
    except (ImportError, AttributeError) as e:
        raise RepbendError(f"Method {name!r} is registered but cannot be imported ({e}).") from None


def _method_configs():
    """Every registered method's ``Config``, checked to carry ``name: Literal[<registered name>]``."""
    from repbend.methods import METHODS

    configs = []
    for n in METHODS.names():
        c = method_class(n).Config
        if c.model_fields["name"].default != n:
            raise RuntimeError(f"method {n!r}: its Config's `name` must default to {n!r}")
        configs.append(c)
    return tuple(configs)


MethodConfig = Annotated[Union[_method_configs()], Field(discriminator="name")]  # type: ignore[valid-type]


class MethodSection(Section):
    """``method: {name: repbend, params: {...}}``: ``params`` is validated ONCE, as the typed ``Config`` of the
    method ``name`` names (a union of every registered method's Config, told apart by ``name``)."""

    name: str = Field("repbend", description="Training method (registry METHODS: repbend, circuit_breakers, rmu, npo).")
    params: MethodConfig = Field(default=None, validate_default=True,  # type: ignore[assignment]
                                 description="The method's own options (see its Config).")

    @model_validator(mode="before")
    @classmethod
    def _tag_params(cls, data: Any) -> Any:
        """Give ``params`` the method's name (its union tag); unknown names fail with a did-you-mean."""
        if not isinstance(data, dict):
            return data
        name = data.get("name", "repbend")
        if not isinstance(name, str):
            return data
        try:
            method_class(name)
        except RepbendError as e:
            raise ValueError(str(e)) from None
        params = data.get("params")
        params = {} if params is None else params
        if isinstance(params, dict):
            if params.get("name", name) != name:
                raise ValueError(f"params.name {params['name']!r} differs from name {name!r}; drop params.name")
            params = {**params, "name": name}
        elif getattr(params, "name", name) != name:
            raise ValueError(f"params are {params.name!r} options but name is {name!r}")
        return {**data, "name": name, "params": params}

    @model_validator(mode="after")
    def _same_method(self) -> "MethodSection":
        if self.params.name != self.name:
            raise ValueError(f"params are {self.params.name!r} options but name is {self.name!r}; set both together")
        return self

    @field_validator("params", mode="wrap")
    @classmethod
    def _plain_locations(cls, value: Any, handler) -> Any:
        """Errors say ``method.params: beta: ...``, without the union's tag in the location."""
        try:
            return handler(value)
        except ValidationError as e:
            lines = [line.split(".", 1)[1] if "." in line.split(":", 1)[0] else line for line in format_errors(e)]
            raise ValueError("; ".join(lines)) from None

    @field_serializer("params")
    def _params_without_tag(self, params) -> dict:
        return {k: v for k, v in params.model_dump(mode="json").items() if k != "name"}


class LoraSection(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(16, gt=0, description="LoRA scaling numerator (lora_alpha).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | str = Field("all-linear", description="Module names to adapt, or 'all-linear'.")
    layers_to_transform: list[int] | None = Field(
        None, description="Decoder blocks (0-based) that get adapters; null = the method's choice "
                          "(RepBend: blocks up to the last target layer), else all blocks.")


class TrainingSection(Section):
    lr: float = Field(1e-5, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    schedule: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        "constant", description="Learning-rate schedule (transformers.get_scheduler).")
    warmup_steps: int = Field(0, ge=0, description="Warm-up steps of the schedule.")
    max_steps: int = Field(150, ge=1, description="Optimizer steps to run.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (effective batch = batch x accum x processes).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null = no clipping.")
    grad_checkpointing: bool = Field(False, description="Recompute activations in backward (less memory, ~30% slower).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "fp32", description="fp32; bf16 autocast (mixed precision, fp32 master weights) on GPU/CPU; auto: bf16 where "
                            "the hardware computes it (a GPU with bf16, an x86 CPU with AMX), else fp32.")
    seed: int = Field(0, description="Seed for data order, LoRA init and dropout.")
    log_every: int = Field(1, ge=1, description="Write loss parts to metrics.csv/TensorBoard every N steps.")
    layer_stats_every: int = Field(25, ge=0, description="Per-layer policy-vs-reference L2/cosine (layers.csv) every N steps; 0 = off.")
    eval_every: int = Field(0, ge=0, description="Loss on val.jsonl every N steps (0 = off).")
    eval_batches: int = Field(4, ge=1, description="Batches in each evaluation.")
    save_every: int = Field(50, ge=0, description="Checkpoint every N steps (0 = only the final weights).")
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints to keep.")


class TrainConfig(Section):
    model: ModelSection = Field(default_factory=ModelSection, description="The base model.")
    data: DataSection = Field(..., description="Training data.")
    method: MethodSection = Field(default_factory=MethodSection, description="Loss / method.")
    lora: LoraSection = Field(default_factory=LoraSection, description="LoRA adapter settings (ignored with full_finetune).")
    full_finetune: bool = Field(False, description="Train all weights; the reference is a frozen copy (+1 model in memory).")
    training: TrainingSection = Field(default_factory=TrainingSection, description="Optimisation and logging.")
    output_dir: UserPath = Field(..., description="Run folder (adapter or weights, config, metrics, checkpoints).")

    @model_validator(mode="before")
    @classmethod
    def _lora_null(cls, data: Any) -> Any:
        """``lora: null`` (or the override ``lora=null``) = no lora section: lets full_finetune runs start from a
        LoRA config file without editing it."""
        if isinstance(data, dict) and "lora" in data and data["lora"] is None:
            data = {k: v for k, v in data.items() if k != "lora"}
        return data

    def dump_exclude(self) -> set[str] | None:
        """Sections the resolved config.yaml leaves out: ``lora`` with full fine-tuning (it would not load back)."""
        return {"lora"} if self.full_finetune else None

    @model_validator(mode="after")
    def _ft_vs_adapter(self) -> "TrainConfig":
        if self.full_finetune and self.model.adapter:
            raise ValueError("full_finetune: cannot continue a LoRA adapter (model.adapter) with full fine-tuning; "
                             "merge it first (repbend merge) or set full_finetune false")
        if self.full_finetune and "lora" in self.model_fields_set:
            raise ValueError("full_finetune: the lora section has no effect with full fine-tuning; remove it "
                             "(or override lora=null) or set full_finetune false")
        return self


def model_shape(spec: str) -> tuple[int, int] | None:
    """(num_layers, hidden_size) read from a local model folder's config.json without loading weights; None if unknown."""
    candidates = [Path(spec)]
    try:
        from repbend.models import resolve_model  # type: ignore[attr-defined]

        resolved = resolve_model(spec)
        if resolved.kind in ("alias", "folder"):
            candidates.insert(0, Path(resolved.location))
    except Exception:  # resolving is best-effort here; load time gives the definitive answer
        pass
    for c in candidates:
        f = c / "config.json"
        if f.is_file():
            cfg = json.loads(f.read_text())
            cfg = cfg.get("text_config", cfg)
            if "num_hidden_layers" in cfg and "hidden_size" in cfg:
                return int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
    return None


def build_method(cfg: TrainConfig, shape: tuple[int, int]):
    """The method object of ``cfg`` for a model of ``shape`` = (num_layers, hidden_size); RepbendError when its
    layers do not fit that model."""
    return method_class(cfg.method.name)(cfg.method.params, *shape)


def check_train_config(cfg: TrainConfig, shape: tuple[int, int] | None = None) -> list[str]:
    """Checks beyond the schema (files, layer ranges) that need no model weights; returns error lines."""
    return checked_method(cfg, shape)[0]


def checked_method(cfg: TrainConfig, shape: tuple[int, int] | None = None):
    """(:func:`check_train_config`'s error lines, the method built for the model's shape or None when the shape is
    unknown before loading or the method did not fit): the trainer builds the method here once."""
    errors: list[str] = []
    method = None
    data = Path(cfg.data.dir)
    if not (data / "train.jsonl").is_file():
        errors.append(f"data.dir: {data} has no train.jsonl; build one with `repbend data build` or fix the path")
    if cfg.model.adapter and not (Path(cfg.model.adapter) / "adapter_config.json").is_file():
        errors.append(f"model.adapter: {cfg.model.adapter} is not a PEFT adapter folder (no adapter_config.json)")
    shape = shape or model_shape(cfg.model.name)
    if shape is not None:
        num_layers, hidden = shape
        try:
            method = build_method(cfg, shape)
        except RepbendError as e:
            errors.append(str(e))
        if not cfg.full_finetune:
            try:
                check_layers(cfg.lora.layers_to_transform or [], num_layers, "lora.layers_to_transform", "block")
            except RepbendError as e:
                errors.append(str(e))
    return errors, method


def resolve_precision(precision: str) -> str:
    """``training.precision`` as run here: ``auto`` becomes bf16 where the hardware computes bf16 products, else fp32;
    an explicit bf16 on a CPU that would emulate it is kept, with a warning."""
    import torch

    from repbend.models.loading import bf16_fast, warn_slow_bf16

    on_gpu = torch.cuda.is_available()
    if precision == "auto":
        return "bf16" if bf16_fast(on_gpu) else "fp32"
    if precision == "bf16" and not on_gpu:
        warn_slow_bf16("training.precision=bf16: training")
    return precision

