"""Circuit Breakers / representation rerouting (Zou et al. 2024, "Improving Alignment and Robustness
with Circuit Breakers", arXiv 2406.04313, Algorithm 1 "LoRRA with RR loss").

With p = ``progress`` in [0, 1] (t/T of the paper):

    c_rr(p)     = alpha * (1 - p / 2)        # rerouting weight: alpha -> alpha/2
    c_retain(p) = alpha * p / 2              # retain weight:    0     -> alpha/2
    L_rr     = mean over (target layer l, selected unsafe token t) of ReLU(cos(h_l,t, h^ref_l,t))
    L_retain = mean over (retain layer l, real token t of the retain splits) of ||h_l,t - h^ref_l,t||_2
    L = c_rr * L_rr + c_retain * L_retain

``h`` is the trained model's hidden state, ``h^ref`` the frozen reference's (adapter disabled).
The paper's schedule is alpha*(1 - t/(2T)), alpha*t/(2T); its public code computes progress as
step/300 with 150 steps, i.e. the same line stopped at t/T = 1. Differences from that code, on purpose:
padding never enters a mean (the code's retain nanmean also counted zeroed padding positions); the whole
model is run (the code drops the blocks after the last target layer while training); and the rerouting
tokens are a token mode (``request_response`` reproduces the code, which used every real token of the
harmful conversation; the default ``response_all`` takes only the harmful answer, whose states are not
shared with retain rows the way the chat-template prefix is). Adapters go on blocks 0..max(target) as in
the code (:meth:`CircuitBreakers.trainable_layers`). The trainer passes p = completed steps / max_steps.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor

from repbend.config import Section
from repbend.errors import RepbendError
from repbend.methods.base import (Method, Need, SeqBatch, States, TokenMode, check_layers, masked_mean, require_rows,
                                  token_mask)


class CircuitBreakersConfig(Section):
    name: Literal["circuit_breakers"] = Field("circuit_breakers", description="Method name (the method section's `name`).")
    alpha: float = Field(10.0, ge=0, description=(
        "Schedule scale alpha: rerouting weight alpha*(1-p/2), retain weight alpha*p/2 at progress p. "
        "Paper code: 10 for Llama-3-8B, 5 for Mistral-7B."))
    target_layers: list[int] = Field([10, 20], min_length=1, description=(
        "Hidden-state indices (0 = embeddings, i = output of block i, L = after the final norm) whose "
        "unsafe representations are rerouted. Paper: 10 and 20 of 32."))
    retain_layers: Literal["all"] | list[int] = Field("all", description=(
        "Hidden-state indices for the retain L2 term: 'all' (0..L) or an explicit list."))
    reroute_tokens: TokenMode = Field("response_all", description=(
        "Unsafe tokens whose representations are rerouted: response_all, request_response (paper code), "
        "request_all, request_last, or response_first_k."))
    reroute_first_k: int = Field(20, ge=1, description="k for reroute_tokens=response_first_k.")
    retain_splits: list[Literal["retain", "safe"]] = Field(["retain", "safe"], min_length=1, description=(
        "Splits whose real (non-padding) tokens the retain term keeps in place (paper: UltraChat + refusals)."))

    @field_validator("target_layers", "retain_splits")
    @classmethod
    def _unique(cls, v: list) -> list:
        if len(set(v)) != len(v):
            raise ValueError(f"contains duplicates {v}; list each entry once")
        return v

    @field_validator("target_layers")
    @classmethod
    def _not_embeddings(cls, v: list[int]) -> list[int]:
        if min(v) < 1:
            raise ValueError("index 0 is the embedding output, which training cannot reroute; use indices >= 1")
        return v


class CircuitBreakers(Method):
    """Representation rerouting: unsafe states made orthogonal to the original ones, safe states kept."""

    name = "circuit_breakers"
    Config = CircuitBreakersConfig

    def __init__(self, config: CircuitBreakersConfig, num_layers: int, hidden_size: int):
        super().__init__(config, num_layers, hidden_size)
        self.target = check_layers(config.target_layers, num_layers, "method.params.target_layers")
        retain = list(range(num_layers + 1)) if config.retain_layers == "all" else config.retain_layers
        self.retain = check_layers(retain, num_layers, "method.params.retain_layers")

    def trainable_layers(self) -> list[int] | None:
        """Blocks 0..max(target) (0-based), as the paper's code (adapters up to the last target layer)."""
        return list(range(min(max(self.target) + 1, self.num_layers)))

    def coefficients(self, progress: float) -> tuple[float, float]:
        """(c_rr, c_retain) at training progress p in [0, 1]."""
        p = min(max(float(progress), 0.0), 1.0)
        return self.config.alpha * (1.0 - p / 2.0), self.config.alpha * p / 2.0

    def needs(self) -> dict[str, Need]:
        out = {"unsafe": Need(layers=tuple(self.target), reference=True)}
        for split in self.config.retain_splits:
            out[split] = Need(layers=tuple(self.retain), reference=True)
        return out

    def check_batch(self, batch: dict[str, SeqBatch]) -> None:
        require_rows(batch, "unsafe", self.name, "the rerouting term")
        for split in self.config.retain_splits:
            require_rows(batch, split, self.name, "the retain term (method.params.retain_splits)")
        if not token_mask(batch["unsafe"], self.config.reroute_tokens, self.config.reroute_first_k).any():
            raise RepbendError(f"method.params.reroute_tokens={self.config.reroute_tokens!r} selects no token of the "
                               "unsafe rows; use response_all or request_response, or check that the data has "
                               "responses.")

    def reroute_loss(self, batch: SeqBatch, policy: States, reference: States) -> tuple[Tensor, Tensor]:
        """(mean ReLU(cos), mean cos) over target layers x selected unsafe tokens."""
        mask = token_mask(batch, self.config.reroute_tokens, self.config.reroute_first_k)
        cos = torch.stack([F.cosine_similarity(policy.hidden[l].float(), reference.hidden[l].float(), dim=-1)
                           for l in self.target])                       # (layers, B, T)
        m = mask.unsqueeze(0).expand_as(cos)
        return masked_mean(torch.relu(cos), m), masked_mean(cos.detach(), m)

    def retain_loss(self, batch: dict[str, SeqBatch], policy: dict[str, States],
                    reference: dict[str, States]) -> Tensor:
        """Mean L2 distance over retain layers x real tokens, pooled over the retain splits."""
        total, count = None, 0.0
        for split in self.config.retain_splits:
            mask = batch[split].attention_mask.bool()
            for l in self.retain:
                dist = (policy[split].hidden[l].float() - reference[split].hidden[l].float()).norm(dim=-1)
                s = (dist * mask).sum()
                total = s if total is None else total + s
                count += float(mask.sum())
        return total / max(count, 1.0)

    def __call__(self, batch, policy, reference, progress):
        c_rr, c_retain = self.coefficients(progress)
        rr, cos = self.reroute_loss(batch["unsafe"], policy["unsafe"], reference["unsafe"])
        retain = self.retain_loss(batch, policy, reference)
        loss = c_rr * rr + c_retain * retain
        parts = {"loss/reroute": rr.item(), "loss/retain": retain.item(), "coef/reroute": c_rr,
                 "coef/retain": c_retain, "cos/unsafe": cos.item()}
        return loss, parts

