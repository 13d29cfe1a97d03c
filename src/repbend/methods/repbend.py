"""RepBend: bend unsafe representations away, keep safe ones and the output distribution in place.

    L = alpha * L_safe - beta * L_unsafe + gamma * L_cos + epsilon * L_KL + eta * L_pair

The loss of the published RepBend code (Yousefpour, Kim et al., ACL 2025), term by term. ``P`` = trained
(policy) model, ``R`` = frozen reference, ``h_l(x)_t`` = hidden state ``l`` at token ``t`` (0 = embedding
output, ``L`` = last block after the final norm, see :mod:`repbend.methods.base`):

* ``L_safe = mean_{l in S} mean_{(b,t) in M_safe} ||h^P_l - h^R_l||_2`` on the safe rows; ``S`` = every hidden
  state 0..L (``safe_layers: all``) or the target layers; ``M_safe`` = the token-mode mask AND the attention
  mask, pooled over all rows (a mean over (row, token) pairs: longer rows weigh more).
* ``L_unsafe``: the same on the unsafe rows, target layers only; it enters with a minus sign.
* ``L_cos = mean_{l in target} sum_{i != j} (1 - cos(h^P_l(u_i), h^P_l(u_j))) / (n (n - 1))`` at the last
  request token of each of the ``n`` unsafe rows (policy states only; n >= 2).
* ``L_KL = T^2 * sum_{(b,t): attention_mask} KL(softmax(z^R/T) || softmax(z^P/T)) / B`` on the ``B`` retain
  rows (``kl_reduction: batchmean``, the published ``kl_div(..., reduction="batchmean")`` over logits masked
  to the real tokens: a padding position adds 0). ``kl_reduction: token_mean`` divides by the number of real
  tokens instead (a per-token mean: smaller by the mean retain length, so epsilon means something else).
* ``L_pair = mean_{l in target} mean_{i, j < k} ||h^P_l(unsafe_i)_{s_i + j} - h^R_l(pair_i)_{s'_i + j}||_2``:
  the same window in each unsafe row and its paired refusal (same request), starting at the last request
  token ``s_i`` / ``s'_i``, ``k = min(pair_tokens, shortest response of those rows)`` over the whole batch,
  as the published code.

Options outside the paper (each off by default; the default-model config uses the first two):
``unsafe_margin = m`` caps each unsafe token's distance at ``m * ||h^R_l||_2`` before averaging (a token bent
that far stops pushing, so the unbounded term cannot run away); ``kl_reduction: token_mean``;
``safe_token_mode`` gives L_safe other tokens than ``token_mode``. Divergence guard: when the unsafe distance exceeds
``max_unsafe_ratio`` x the reference states' mean norm on the same tokens, the call raises
:class:`DivergenceError` (the trainer stops and keeps the last good checkpoint).

Hand-derived case (one layer, hidden size 2): safe policy (3, 4), reference (0, 0) -> L_safe = 5. Unsafe
policy last-request states (1, 0) and (0, 1) -> cos = 0 for both ordered pairs -> L_cos = 1. One retain row
of one token, reference logits (0, 0), policy logits (2 ln 3, 0) at T = 2: p^R = (1/2, 1/2),
p^P = (3/4, 1/4), KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3); times T^2 = 4, over 1 row -> L_KL = 2 ln(4/3).
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from repbend.config import Section
from repbend.errors import DivergenceError, RepbendError
from repbend.layers import check_layers
from repbend.methods.base import Method, Need, SeqBatch, States, TokenMode, kl_ref_policy, token_mask

# The paper's window (hidden states 20..30 of a 32-block model), used relative to depth when not set.
_PAPER_WINDOW = (20 / 32, 30 / 32)
# Fields of older versions (experimental terms, removed) -> their "off" value (_ANY: only matters when another is on).
_ANY = object()
_REMOVED = {"zeta": 0, "nu": 0, "steer_state": None, "unsafe_skip_shared_prefix": False, "direction_token_mode": _ANY,
            "direction_safe_kinds": _ANY, "direction_rows": _ANY, "direction_margin": _ANY, "steer_coefficient": _ANY,
            "steer_fraction": _ANY, "nll_split": _ANY}


class RepBendConfig(Section):
    name: Literal["repbend"] = Field("repbend", description="Method name (the method section's `name`).")
    alpha: float = Field(0.5, ge=0, description="Weight of L_safe (keep safe representations where they were).")
    beta: float = Field(0.5, ge=0, description="Weight of L_unsafe (push unsafe representations away; enters with -).")
    gamma: float = Field(0.1, ge=0, description="Weight of L_cos (pull unsafe last-request states together).")
    epsilon: float = Field(0.3, ge=0, description="Weight of L_KL (KL(reference||policy) on retain chat data).")
    eta: float = Field(0.0, ge=0, description="Weight of L_pair (policy on unsafe -> reference on its refusal); 0 = off.")
    token_mode: TokenMode = Field("response_all", description="Tokens whose distances count in L_safe/L_unsafe.")
    safe_token_mode: TokenMode | None = Field(
        None, description="Tokens of L_safe when they should differ from token_mode (null = token_mode). Not in "
                          "the paper.")
    k: int = Field(20, ge=1, description="Number of response tokens for token_mode response_first_k.")
    safe_layers: Literal["all", "target"] = Field("all", description="Hidden states of L_safe: all (0..L) or target.")
    target_layers: list[int] | None = Field(
        None, description="Hidden-state indices for L_unsafe/L_cos/L_pair (0 = embeddings, L = last block). "
                          "Default: the paper's relative window (20..30 of 32) scaled to the model depth.")
    target_start: int | None = Field(None, ge=0, description="First target hidden-state index (with target_window).")
    target_window: int | None = Field(None, ge=1, description="Number of consecutive target layers from target_start.")
    kl_temperature: float = Field(2.0, gt=0, description="Softmax temperature T of L_KL (scaled by T^2).")
    kl_reduction: Literal["batchmean", "token_mean"] = Field(
        "batchmean", description="L_KL's normaliser: batchmean = summed over the real retain tokens, divided by the "
                                 "number of retain rows (the published code); token_mean = divided by the number "
                                 "of real retain tokens (a per-token mean; not in the paper).")
    pair_tokens: int = Field(20, ge=1, description="Length of L_pair's window (from the last request token).")
    unsafe_margin: float | None = Field(
        None, gt=0, description="Cap each unsafe token's distance at this multiple of the reference state's norm "
                                "before averaging (tokens already bent that far stop pushing). null = the paper's "
                                "unbounded L_unsafe.")
    max_unsafe_ratio: float | None = Field(
        100.0, gt=0, description="Stop (DivergenceError) when L_unsafe exceeds this multiple of the reference "
                                 "states' mean norm; null disables the guard.")

    @model_validator(mode="before")
    @classmethod
    def _older_dumps(cls, data: Any) -> Any:
        """Resolved configs of older versions (a run folder's config.yaml) load: they carry the experimental
        fields since removed, which must be off, and they trained L_KL as a per-token mean."""
        if not isinstance(data, dict) or not _REMOVED.keys() & data.keys():
            return data
        on = [k for k, off in _REMOVED.items() if off is not _ANY and data.get(k, off) not in (off, None)]
        if on:
            raise ValueError(f"{', '.join(on)}: removed from RepBend (experimental terms outside the paper); this "
                             f"config turns them on, so it cannot be trained or compared any more")
        return {"kl_reduction": "token_mean", **{k: v for k, v in data.items() if k not in _REMOVED}}

    @model_validator(mode="after")
    def _layer_spec(self) -> "RepBendConfig":
        if self.target_layers is not None and (self.target_start is not None or self.target_window is not None):
            raise ValueError("target_layers: give either an explicit list or target_start + target_window, not both")
        if (self.target_start is None) != (self.target_window is None):
            raise ValueError("target_start/target_window: set both (or neither)")
        if self.target_layers is not None:
            if not self.target_layers:
                raise ValueError("target_layers: must not be empty (or set it to null for the default window)")
            if len(set(self.target_layers)) != len(self.target_layers):
                raise ValueError("target_layers: contains duplicates")
        return self


def resolve_target_layers(cfg: RepBendConfig, num_layers: int) -> list[int]:
    """Target hidden-state indices for a model with ``num_layers`` blocks; RepbendError when out of range."""
    if cfg.target_layers is not None:
        layers, field = sorted(cfg.target_layers), "method.target_layers"
    elif cfg.target_start is not None:
        layers, field = list(range(cfg.target_start, cfg.target_start + cfg.target_window)), \
            "method.target_start/target_window"
    else:
        lo, hi = (round(f * num_layers) for f in _PAPER_WINDOW)
        layers, field = list(range(max(lo, 1), max(hi, 1) + 1)), "method.target_layers"
    return check_layers(layers, num_layers, field)


def mean_l2(policy: States, reference: States, layers: list[int], mask: Tensor, cap: float | None = None) -> Tensor:
    """Mean over (layer, selected token) of ||policy - reference||_2, each distance capped at
    ``cap * ||reference||_2`` of that token when ``cap`` is set."""
    per_layer = []
    for l in layers:
        ref = reference.hidden[l][mask].float()
        d = (policy.hidden[l][mask].float() - ref).norm(dim=-1)
        if cap is not None:
            d = torch.minimum(d, cap * ref.norm(dim=-1))
        per_layer.append(d.mean())
    return torch.stack(per_layer).mean()


def mean_offdiag_one_minus_cos(x: Tensor) -> Tensor:
    """mean_{i != j} (1 - cos(x_i, x_j)) for rows of ``x`` (n, H), n >= 2."""
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    n = x.shape[0]
    cos = x @ x.T
    return (n * (n - 1) - (cos.sum() - cos.diagonal().sum())) / (n * (n - 1))


class RepBend(Method):
    """The RepBend loss (see the module docstring for the exact formulas and normalisation)."""

    name = "repbend"
    Config = RepBendConfig

    def __init__(self, config: RepBendConfig, num_layers: int, hidden_size: int):
        super().__init__(config, num_layers, hidden_size)
        self.target = resolve_target_layers(config, num_layers)
        self.safe = list(range(num_layers + 1)) if config.safe_layers == "all" else self.target
        self.safe_mode = config.safe_token_mode or config.token_mode

    def needs(self) -> dict[str, Need]:
        c, t = self.config, tuple(self.target)
        out: dict[str, Need] = {}
        if c.alpha > 0:
            out["safe"] = Need(layers=tuple(self.safe), reference=True)
        if c.beta > 0 or c.gamma > 0 or c.eta > 0:
            out["unsafe"] = Need(layers=t, reference=c.beta > 0)
        if c.epsilon > 0:
            out["retain"] = Need(logits=True, reference=True)
        if c.eta > 0:
            out["pair"] = Need(layers=t, reference=True, policy=False)
        return out

    def trainable_layers(self) -> list[int] | None:
        """Blocks 0..max(target) (0-based), as the reference code's "layers up to the last target layer"."""
        return list(range(min(max(self.target) + 1, self.num_layers)))

    def check_batch(self, batch: dict[str, SeqBatch]) -> None:
        c = self.config
        needs = self.needs()
        for split in needs:
            if split not in batch or batch[split].size == 0:
                raise RepbendError(f"The batch has no {split!r} rows but the repbend loss needs them "
                                   f"(alpha/beta/gamma/epsilon/eta > 0); add {split} rows to the data or set that "
                                   f"weight to 0.")
        for split, mode, field, weight in (("safe", self.safe_mode, "safe_token_mode", c.alpha),
                                           ("unsafe", c.token_mode, "token_mode", c.beta)):
            if split in batch and weight > 0 and not token_mask(batch[split], mode, c.k).any():
                raise RepbendError(f"{field} {mode!r} selects no tokens in the {split!r} rows "
                                   f"(e.g. rows without responses); pick another method.{field} or fix the data.")
        if c.gamma > 0 and batch["unsafe"].size < 2:
            raise RepbendError("L_cos needs at least 2 unsafe rows per batch; raise the unsafe batch size or set gamma 0.")
        if "pair" in needs and batch["pair"].size != batch["unsafe"].size:
            raise RepbendError("The pair split must have one refusal row per unsafe row (same pair_id).")

    def __call__(self, batch: dict[str, SeqBatch], policy: dict[str, States], reference: dict[str, States],
                 progress: float) -> tuple[Tensor, dict[str, float]]:
        c = self.config
        loss = torch.zeros((), device=batch[next(iter(batch))].input_ids.device)
        parts: dict[str, float] = {}
        if c.alpha > 0:
            m = token_mask(batch["safe"], self.safe_mode, c.k)
            l_safe = mean_l2(policy["safe"], reference["safe"], self.safe, m)
            loss = loss + c.alpha * l_safe
            parts["loss/safe"] = l_safe.item()
        if c.beta > 0:
            m = token_mask(batch["unsafe"], c.token_mode, c.k)
            l_unsafe = mean_l2(policy["unsafe"], reference["unsafe"], self.target, m, cap=c.unsafe_margin)
            loss = loss - c.beta * l_unsafe
            parts["loss/unsafe"] = l_unsafe.item()
            self._guard(l_unsafe, reference["unsafe"], m)
        if c.gamma > 0:
            u = batch["unsafe"]
            rows = torch.arange(u.size, device=u.input_ids.device)
            l_cos = torch.stack([mean_offdiag_one_minus_cos(policy["unsafe"].hidden[l][rows, u.last_request_index])
                                 for l in self.target]).mean()
            loss = loss + c.gamma * l_cos
            parts["loss/cos"] = l_cos.item()
        if c.epsilon > 0:
            m = batch["retain"].attention_mask.bool()
            rows = batch["retain"].size if c.kl_reduction == "batchmean" else None
            l_kl = kl_ref_policy(policy["retain"].logits_at(m), reference["retain"].logits_at(m), c.kl_temperature, rows)
            loss = loss + c.epsilon * l_kl
            parts["loss/kl"] = l_kl.item()
        if c.eta > 0:
            l_pair = self._pair(batch["unsafe"], batch["pair"], policy["unsafe"], reference["pair"])
            loss = loss + c.eta * l_pair
            parts["loss/pair"] = l_pair.item()
        return loss, parts

    def _pair(self, unsafe: SeqBatch, pair: SeqBatch, pol: States, ref: States) -> Tensor:
        resp = torch.minimum(unsafe.response_mask.sum(1), pair.response_mask.sum(1))
        k = min(self.config.pair_tokens, int(resp.min()))
        if k < 1:
            raise RepbendError("L_pair: an unsafe row or its paired refusal has no response tokens; set eta 0 or fix "
                               "the data.")
        steps = torch.arange(k, device=resp.device)
        iu, ip = unsafe.last_request_index[:, None] + steps, pair.last_request_index[:, None] + steps
        rows = torch.arange(unsafe.size, device=resp.device)[:, None]
        return torch.stack([(pol.hidden[l][rows, iu].float() - ref.hidden[l][rows, ip].float()).norm(dim=-1).mean()
                            for l in self.target]).mean()

    def _guard(self, l_unsafe: Tensor, ref: States, mask: Tensor) -> None:
        limit = self.config.max_unsafe_ratio
        if limit is None:
            return
        scale = torch.stack([ref.hidden[l][mask].float().norm(dim=-1).mean() for l in self.target]).mean()
        if float(l_unsafe.detach()) > limit * float(scale):
            raise DivergenceError(
                f"L_unsafe = {float(l_unsafe.detach()):.4g} exceeds max_unsafe_ratio {limit:g} x the reference norm "
                f"{float(scale):.4g}: the unsafe representations are exploding; lower method.params.beta or the "
                f"learning rate, or raise method.params.max_unsafe_ratio.")
