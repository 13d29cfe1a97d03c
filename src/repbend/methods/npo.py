"""NPO, Negative Preference Optimization (Zhang et al. 2024, "Negative Preference Optimization: From
Catastrophic Collapse to Effective Unlearning", arXiv 2404.05868), with optional retain terms.

For each unsafe row i (harmful request x, harmful answer y):

    r_i      = log pi(y|x) - log pi_ref(y|x),   log pi(y|x) = sum of the answer's next-token log-probs
    L_NPO    = -(2/beta) * mean_i log sigmoid(-beta * r_i)          (paper eq. 3; note the minus sign)
    L_NLL    = mean over safe answer tokens of -log pi(token | prefix)          (weight gamma; NPO+RT)
    L_KL     = T^2 * mean over real tokens of the kl split of KL(pi_ref/T || pi/T)   (weight delta; NPO-KL)
    L = L_NPO + gamma * L_NLL + delta * L_KL

The gradient of L_NPO is E[w_i * grad log pi(y_i|x_i)] with w_i = 2 pi^beta / (pi^beta + pi_ref^beta) > 0,
so minimising it LOWERS the probability of the harmful answers (beta -> 0 gives gradient ascent). At the
start (pi = pi_ref) L_NPO = (2/beta) log 2. The trainer's reference is the same network with the adapter
disabled, exactly the paper's pi_ref (the initial model).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from repbend.config import Section
from repbend.errors import RepbendError
from repbend.methods.base import Method, Need, SeqBatch, States, kl_ref_policy, require_rows, response_nll


class NPOConfig(Section):
    name: Literal["npo"] = Field("npo", description="Method name (the method section's `name`).")
    beta: float = Field(0.1, gt=0, description="Inverse temperature beta of NPO (paper: 0.1).")
    gamma: float = Field(1.0, ge=0, description="Weight of the NLL on safe answers (0 disables it).")
    delta: float = Field(0.0, ge=0, description="Weight of KL(reference || trained) on kl_split tokens (0 = off).")
    kl_split: Literal["retain", "safe"] = Field("retain", description="Split whose real tokens the KL term covers.")
    kl_temperature: float = Field(1.0, gt=0, description="Softmax temperature T of the KL term (scaled by T^2).")


def sequence_logprob(states: States, batch: SeqBatch) -> Tensor:
    """Sum of the response tokens' log-probabilities per row: (B,)."""
    target = batch.response_mask.bool()
    lp = states.next_token_logprobs(batch.input_ids, target)
    rows = target[:, 1:].nonzero()[:, 0]
    return torch.zeros(batch.size, dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)


def npo_loss(logp: Tensor, ref_logp: Tensor, beta: float) -> Tensor:
    """-(2/beta) * mean log sigmoid(-beta * (logp - ref_logp))."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp)).mean()


class NPO(Method):
    """Lower the likelihood of harmful answers relative to the frozen model, without collapse."""

    name = "npo"
    Config = NPOConfig

    def needs(self) -> dict[str, Need]:
        c = self.config
        out = {"unsafe": Need(logits=True, reference=True)}
        if c.gamma > 0:
            out["safe"] = Need(logits=True)
        if c.delta > 0:
            out[c.kl_split] = Need(logits=True, reference=True)
        return out

    def check_batch(self, batch: dict[str, SeqBatch]) -> None:
        require_rows(batch, "unsafe", self.name, "the NPO term")
        if not batch["unsafe"].response_mask[:, 1:].any():
            raise RepbendError("npo needs harmful answers in the unsafe rows (no response token found); "
                               "rebuild the data with responses.")
        if self.config.gamma > 0:
            require_rows(batch, "safe", self.name, "the NLL term (set method.params.gamma=0 to drop it)")
        if self.config.delta > 0:
            require_rows(batch, self.config.kl_split, self.name, "the KL term (set method.params.delta=0 to drop it)")

    def __call__(self, batch, policy, reference, progress):
        c = self.config
        logp = sequence_logprob(policy["unsafe"], batch["unsafe"])
        with torch.no_grad():
            ref_logp = sequence_logprob(reference["unsafe"], batch["unsafe"])
        npo = npo_loss(logp, ref_logp, c.beta)
        loss, parts = npo, {"loss/npo": npo.item(), "npo/log_ratio": (logp - ref_logp).mean().item()}
        if c.gamma > 0:
            nll = response_nll(policy["safe"], batch["safe"])
            loss = loss + c.gamma * nll
            parts["loss/nll"] = nll.item()
        if c.delta > 0:
            mask = batch[c.kl_split].attention_mask.bool()
            with torch.no_grad():
                ref_logits = reference[c.kl_split].logits_at(mask)
            kl = kl_ref_policy(policy[c.kl_split].logits_at(mask), ref_logits, c.kl_temperature)
            loss = loss + c.delta * kl
            parts["loss/kl"] = kl.item()
        return loss, parts
