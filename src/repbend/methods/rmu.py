"""RMU, Representation Misdirection for Unlearning (Li et al. 2024, "The WMDP Benchmark: Measuring and
Reducing Malicious Use With Unlearning", arXiv 2403.03218, Section 5).

At one hidden-state index l (0 = embeddings, i = output of block i):

    u        = r / ||r||,  r_j ~ U[0, 1) i.i.d., drawn once from a torch.Generator seeded with ``seed``
    L_forget = mean over selected unsafe tokens t of  (1/H) ||h_l,t - c * u||^2
    L_retain = mean over real tokens t of the retain splits of  (1/H) ||h_l,t - h^ref_l,t||^2
    L = L_forget + alpha * L_retain

The paper writes squared L2 norms averaged over tokens; its public code uses ``mse_loss`` (mean over tokens
AND the H hidden dimensions), which is what the 1/H above reproduces, so its coefficients (c = 6.5,
alpha = 1200 for Zephyr-7B) keep their meaning. The forget tokens default to the harmful ANSWER: the
chat-template prefix (system prompt, role tags) is the same text in unsafe and retain rows, so with a
causal model its activations are identical and ``request_response`` would ask the same states to move to
c*u and to stay put at once (the paper's forget documents share no such prefix). Padding never enters
a mean (the code's mse_loss also averaged over zeroed padding positions). The paper hooks the output of
``model.layers[7]`` (0-based module index 7), which is hidden-state index 8 here, and updates only the
MLP weights of modules 5, 6, 7; :meth:`RMU.trainable_layers` returns those 0-based blocks so the trainer
puts adapters (or full-FT gradients) only there; which projections are trained is the LoRA
``target_modules`` setting (full fine-tuning trains every weight of those blocks).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from repbend.config import Section
from repbend.errors import ConfigError, RepbendError
from repbend.methods.base import (Method, Need, SeqBatch, States, TokenMode, check_layers, masked_mean, require_rows,
                                  token_mask)


class RMUConfig(Section):
    name: Literal["rmu"] = Field("rmu", description="Method name (the method section's `name`).")
    layer: int = Field(8, ge=1, description=(
        "Hidden-state index l whose activations are steered (i = output of block i; paper: module 7 = index 8)."))
    steering_coef: float = Field(6.5, gt=0, description="Steering coefficient c: unsafe activations go to c*u.")
    alpha: float = Field(1200.0, ge=0, description="Weight of the retain MSE (paper: 1200 for Zephyr-7B).")
    seed: int = Field(0, description="Seed of the fixed random direction u (independent of the training seed).")
    forget_tokens: TokenMode = Field("response_all", description=(
        "Unsafe tokens pushed toward c*u: response_all (default), request_response (every real token, like "
        "the paper's forget documents), request_all, request_last, or response_first_k."))
    forget_first_k: int = Field(20, ge=1, description="k for forget_tokens=response_first_k.")
    retain_splits: list[Literal["retain", "safe"]] = Field(["retain", "safe"], min_length=1, description=(
        "Splits whose real tokens keep their layer-l activations (MSE to the frozen model)."))
    trainable_layers: list[int] | None = Field(None, description=(
        "0-based decoder blocks that may change; null = the three blocks ending at layer (l-3, l-2, l-1), "
        "i.e. the paper's modules l-2..l in its 0-based module numbering."))

    @field_validator("retain_splits", "trainable_layers")
    @classmethod
    def _unique(cls, v):
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"contains duplicates {v}; list each entry once")
        return v


def random_direction(hidden_size: int, seed: int) -> Tensor:
    """The fixed unit vector u: entries i.i.d. U[0, 1) from a generator seeded with ``seed``, then normalised."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    r = torch.rand(hidden_size, generator=g, dtype=torch.float32)
    return r / r.norm()


class RMU(Method):
    """Steer unsafe activations at one layer to a fixed random direction; keep safe ones in place."""

    name = "rmu"
    Config = RMUConfig

    def __init__(self, config: RMUConfig, num_layers: int, hidden_size: int):
        super().__init__(config, num_layers, hidden_size)
        self.layer = check_layers([config.layer], num_layers, "method.params.layer")[0]
        if config.trainable_layers is None:
            blocks = [b for b in (self.layer - 3, self.layer - 2, self.layer - 1) if b >= 0]
        else:
            blocks = sorted(config.trainable_layers)
            bad = [b for b in blocks if not 0 <= b < self.layer]
            if bad:
                raise ConfigError(f"method.params.trainable_layers: blocks {bad} cannot change hidden state "
                                  f"{self.layer}; use 0-based blocks in 0..{self.layer - 1} (block b produces "
                                  f"index b+1).")
        self.blocks = blocks
        self.u = random_direction(hidden_size, config.seed)

    def trainable_layers(self) -> list[int] | None:
        return list(self.blocks)

    def needs(self) -> dict[str, Need]:
        out = {"unsafe": Need(layers=(self.layer,))}
        for split in self.config.retain_splits:
            out[split] = Need(layers=(self.layer,), reference=True)
        return out

    def check_batch(self, batch: dict[str, SeqBatch]) -> None:
        require_rows(batch, "unsafe", self.name, "the forget term")
        for split in self.config.retain_splits:
            require_rows(batch, split, self.name, "the retain term (method.params.retain_splits)")
        if not token_mask(batch["unsafe"], self.config.forget_tokens, self.config.forget_first_k).any():
            raise RepbendError(f"method.params.forget_tokens={self.config.forget_tokens!r} selects no token of the "
                               "unsafe rows; use request_response, or check that the data has responses.")

    def forget_loss(self, batch: SeqBatch, policy: States) -> Tensor:
        h = policy.hidden[self.layer].float()
        target = self.config.steering_coef * self.u.to(h.device)
        per_token = (h - target).pow(2).mean(dim=-1)                      # (B, T)
        return masked_mean(per_token, token_mask(batch, self.config.forget_tokens, self.config.forget_first_k))

    def retain_loss(self, batch: dict[str, SeqBatch], policy: dict[str, States],
                    reference: dict[str, States]) -> Tensor:
        total, count = None, 0.0
        for split in self.config.retain_splits:
            mask = batch[split].attention_mask.bool()
            diff = policy[split].hidden[self.layer].float() - reference[split].hidden[self.layer].float()
            s = (diff.pow(2).mean(dim=-1) * mask).sum()
            total = s if total is None else total + s
            count += float(mask.sum())
        return total / max(count, 1.0)

    def __call__(self, batch, policy, reference, progress):
        forget = self.forget_loss(batch["unsafe"], policy["unsafe"])
        retain = self.retain_loss(batch, policy, reference)
        loss = forget + self.config.alpha * retain
        with torch.no_grad():
            h = policy["unsafe"].hidden[self.layer].float()
            norm = masked_mean(h.norm(dim=-1), batch["unsafe"].attention_mask.bool())
        return loss, {"loss/forget": forget.item(), "loss/retain": retain.item(), "rmu/unsafe_norm": norm.item()}
