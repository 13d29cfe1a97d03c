"""Training: one accelerate loop for every registered method (LoRA or full fine-tuning).

Public API: :func:`train` ``(cfg: TrainConfig, resume=False, overwrite=False) -> Path`` (the run folder),
:class:`TrainConfig`, :func:`merge` ``(adapter, output, base=None) -> Path``. Heavy imports are lazy.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the config module builds the method union, which imports the methods (torch)
    from repbend.training.config import TrainConfig


def __getattr__(name: str) -> Any:
    if name == "TrainConfig":
        from repbend.training.config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'repbend.training' has no attribute {name!r}")


def train(cfg: "TrainConfig", resume: bool = False, overwrite: bool = False):
    from repbend.training.trainer import train as _train

    return _train(cfg, resume=resume, overwrite=overwrite)


def merge(adapter, output, base=None, dtype: str = "float32"):
    from repbend.training.merging import merge as _merge

    return _merge(adapter, output, base=base, dtype=dtype)


__all__ = ["TrainConfig", "train", "merge"]
