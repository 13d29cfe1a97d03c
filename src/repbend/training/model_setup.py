"""Trainable model + frozen reference: LoRA (reference = adapter disabled) or full fine-tuning (frozen copy).

Memory: LoRA adds only the adapter weights and their optimizer state (the reference pass runs the
same network with ``disable_adapter()``). Full fine-tuning keeps a frozen copy of the model as the
reference (+1 x model weights, in the load dtype, on every process) plus AdamW state for every
trainable weight (2 x fp32 per parameter) — about 4x the weights' memory for an fp32 model.
"""
from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch

from repbend.errors import RepbendError
from repbend.layers import check_layers
from repbend.training.config import TrainConfig

_BLOCK = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class ModelPair:
    model: torch.nn.Module                    # trainable (PeftModel or the full model)
    tokenizer: object
    reference: torch.nn.Module | None         # frozen copy (full FT) or None (LoRA: same network)
    num_layers: int
    hidden_size: int
    trainable_blocks: list[int] | None = None
    info: dict = field(default_factory=dict)

    def reference_context(self, unwrapped: torch.nn.Module) -> Callable[[], ContextManager]:
        """Context in which calling the (wrapped) policy model gives the reference outputs (LoRA only)."""
        if self.reference is not None:
            return contextlib.nullcontext
        return unwrapped.disable_adapter


def shape_of(model) -> tuple[int, int]:
    cfg = getattr(model.config, "text_config", model.config)
    return int(cfg.num_hidden_layers), int(cfg.hidden_size)


def build_models(cfg: TrainConfig, method=None) -> tuple[ModelPair, object]:
    """Load the base model, attach LoRA or set up full fine-tuning; ``method`` = the method already built for this
    model's shape, or None to build it now from the loaded model's shape (validates its layers)."""
    from repbend.training.config import build_method
    from repbend.models import load_model

    # Loaded on the CPU in fp32 (master weights); accelerate moves it to this process's device.
    model, tokenizer = load_model(cfg.model.name, adapter=cfg.model.adapter, device="cpu", dtype="float32",
                                  trust_remote_code=cfg.model.trust_remote_code, for_training=True)
    num_layers, hidden = shape_of(model)
    if method is None:
        method = build_method(cfg, (num_layers, hidden))
    elif (method.num_layers, method.hidden_size) != (num_layers, hidden):
        raise RepbendError(f"{cfg.model.name}: config.json says {method.num_layers} blocks of width {method.hidden_size} "
                           f"but the loaded model has {num_layers} of width {hidden}.")
    blocks = cfg.lora.layers_to_transform if not cfg.full_finetune else None
    blocks = blocks if blocks is not None else method.trainable_layers()
    if blocks is not None:
        check_layers(blocks, num_layers, "lora.layers_to_transform", "block")
    if cfg.training.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if cfg.full_finetune:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        for name, p in model.named_parameters():
            m = _BLOCK.search(name)
            p.requires_grad_(blocks is None or (m is not None and int(m.group(1)) in blocks))
        pair = ModelPair(model, tokenizer, reference, num_layers, hidden, blocks)
    else:
        pair = ModelPair(_attach_lora(model, cfg, blocks), tokenizer, None, num_layers, hidden, blocks)
    pair.model.train()
    n_train = sum(p.numel() for p in pair.model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in pair.model.parameters())
    pair.info = {"trainable_params": n_train, "all_params": n_all, "trainable_blocks": blocks,
                 "num_layers": num_layers, "hidden_size": hidden}
    return pair, method


def _attach_lora(model, cfg: TrainConfig, blocks: list[int] | None):
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):  # model.adapter: load_model attached it (trainable); keep training it
        return model
    lc = cfg.lora
    targets = linear_block_modules(model) if lc.target_modules == "all-linear" else lc.target_modules
    peft_cfg = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=targets,
                          layers_to_transform=blocks, task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, peft_cfg)


def linear_block_modules(model) -> list[str]:
    """Names (last component) of every nn.Linear inside the decoder blocks: 'all-linear' made explicit.

    peft refuses ``layers_to_transform`` with the string ``"all-linear"``, so we expand it ourselves
    (the LM head is not inside a block, hence never adapted).
    """
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and _BLOCK.search(n + ".")}
    if not names:
        raise RepbendError("lora.target_modules: found no linear layers inside decoder blocks; list the module "
                           "names to adapt explicitly.")
    return sorted(names)
