"""Training: one accelerate loop for every registered method (LoRA or full fine-tuning).

Public API: :func:`train` ``(cfg: TrainConfig, resume=False, overwrite=False) -> Path`` (the run folder),
:class:`TrainConfig`, :func:`merge` ``(adapter, output, base=None) -> Path``. Heavy imports are lazy.
"""
from __future__ import annotations

from repbend.training.config import TrainConfig


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False):
    from repbend.training.trainer import train as _train

    return _train(cfg, resume=resume, overwrite=overwrite)


def merge(adapter, output, base=None, dtype: str = "float32"):
    from repbend.training.merging import merge as _merge

    return _merge(adapter, output, base=base, dtype=dtype)


__all__ = ["TrainConfig", "train", "merge"]
