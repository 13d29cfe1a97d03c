"""Checkpoints and resume: ``<run>/checkpoints/step-NNNNNN/`` written by ``accelerator.save_state``.

A checkpoint holds the trainable weights only (LoRA: the adapter tensors, not the frozen base; full
fine-tuning: the trainable blocks), the optimizer, per-process RNG states (Python, NumPy, torch,
CUDA), and the registered :class:`TrainState` (optimizer step, sampler position, scheduler). With
DeepSpeed/FSDP accelerate writes its own sharded formats. A LoRA checkpoint also carries ``adapter/``
(``PeftModel.from_pretrained``-loadable) so intermediate steps can be evaluated.

Resuming checks that the run folder's saved config matches the new one on everything that shapes
the weights (model, method, LoRA, full_finetune, data, seed, batch sizes) BEFORE any model is loaded.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml

from repbend.errors import RepbendError
from repbend.training.config import TrainConfig

_STEP = re.compile(r"^step-(\d+)$")
# Settings that must not change between a run and its resumption (dotted paths into the config).
MUST_MATCH = ("model", "method", "lora", "full_finetune", "data.dir", "data.batch_size", "data.max_request_tokens",
              "data.max_response_tokens", "data.length_bucketing", "training.seed", "training.grad_accum",
              "training.lr", "training.schedule", "training.warmup_steps", "training.precision")


class TrainState:
    """Everything about the loop position that accelerate does not save by itself."""

    def __init__(self, sampler, scheduler):
        self.step = 0
        self.sampler = sampler
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        return {"step": self.step, "sampler": self.sampler.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self.scheduler.load_state_dict(state["scheduler"])


def checkpoints(run_dir: Path) -> list[Path]:
    d = run_dir / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STEP.match(p.name)) and (p / "DONE").is_file()]
    return [p for _, p in sorted(found)]


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def config_diff(old: dict, new: dict, keys: tuple[str, ...] = MUST_MATCH) -> list[str]:
    """The dotted ``keys`` on which two dumped train configs differ (default: what shapes the weights)."""
    return [k for k in keys if _get(old, k) != _get(new, k)]


def prepare_run_dir(cfg: TrainConfig, resume: bool) -> Path | None:
    """Check the output folder; return the checkpoint to resume from (None = fresh start)."""
    run_dir = Path(cfg.output_dir)
    found = checkpoints(run_dir)
    has_run = (run_dir / "config.yaml").is_file()
    if not resume:
        if found or (run_dir / "metrics.csv").is_file():
            raise RepbendError(f"output_dir {run_dir} already holds a run; pass --resume to continue it or choose "
                               f"another output_dir.")
        return None
    if not has_run or not found:
        raise RepbendError(f"--resume: {run_dir} has no checkpoint to resume from; run without --resume.")
    old = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    new = cfg.model_dump(mode="json")
    diff = config_diff(old, new)
    if diff:
        raise RepbendError(f"--resume: the config differs from the run in {run_dir} on {', '.join(diff)} "
                           f"(adapter/base/method mismatch); resume with the original config or start a new output_dir.")
    return found[-1]


def only_trainable_hook(models, weights, output_dir) -> None:
    """accelerate save hook: keep only trainable tensors (LoRA adapters, unfrozen blocks) in the checkpoint."""
    for model, state in zip(models, weights):
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        for key in [k for k in state if k not in keep]:
            del state[key]


def save_checkpoint(accelerator, run_dir: Path, step: int, unwrapped, keep: int) -> Path:
    path = run_dir / "checkpoints" / f"step-{step:06d}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        if hasattr(unwrapped, "peft_config"):
            unwrapped.save_pretrained(str(path / "adapter"))
        (path / "DONE").write_text(str(step))
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path
