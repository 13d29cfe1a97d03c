"""RepBend: bend unsafe representations away, keep safe ones and the output distribution in place.

    L = alpha * L_safe - beta * L_unsafe + gamma * L_cos + epsilon * L_KL + eta * L_pair - zeta * L_dir + nu * L_NLL

Exact normalisation (``P`` = trained/policy model, ``R`` = frozen reference, ``h_l(x)_t`` = hidden
state ``l`` at token ``t``; hidden-state index 0 = embedding output, ``L`` = last block after the
final norm, see :mod:`repbend.methods.base`):

* ``L_safe = mean_{l in S} mean_{(b,t) in M_safe} ||h^P_l - h^R_l||_2`` on the safe rows, where
  ``S`` = every hidden state 0..L (``safe_layers: all``) or the target layers (``target``) and
  ``M_safe`` = the token-mode mask (``safe_token_mode`` when set, else ``token_mode``) AND the
  attention mask, pooled over ALL rows of the batch (a mean over (row, token) pairs, so longer rows
  weigh more; not a mean of per-row means).
* ``L_unsafe``: the same on the unsafe rows, target layers only. It enters with a minus sign. With
  ``unsafe_margin = m`` (not in the paper; off by default) each token's distance is first capped at
  ``m * ||h^R_l||_2``: once a token is bent that far it stops pushing, so the unbounded term cannot
  run away and drag the safe behaviour with it. With ``unsafe_skip_shared_prefix`` (not in the paper;
  off by default) an unsafe row's leading tokens that some safe or retain row of the same step shares
  token for token (the chat template's system prompt and role header, or a whole request that also has
  a paired refusal) are left out of ``M_unsafe``: a causal model gives them the same states in both
  rows, so pushing one while ``L_safe`` pins the other is a contradiction, not a signal.
* ``L_cos = mean_{l in target} [ sum_{i != j} (1 - cos(h^P_l(u_i), h^P_l(u_j))) / (n (n - 1)) ]``
  at the last request token of each of the ``n`` unsafe rows (policy states only; needs n >= 2).
* ``L_KL = T^2 * mean_{(b,t): attention_mask} sum_v p^R_v (log p^R_v - log p^P_v)`` with
  ``p = softmax(logits / T)`` on the retain rows: KL(reference || policy) of the next-token
  distribution at every non-padding position (the last one included), averaged over those tokens.
* ``L_pair = mean_{l in target} mean_{(i, j)} ||h^P_l(unsafe_i)_{r_ij} - h^R_l(pair_i)_{r'_ij}||_2``
  where ``r_ij`` / ``r'_ij`` is the position of the j-th response token (j < ``pair_tokens``) of
  unsafe row i / its paired refusal row i; j runs up to the shorter of the two responses.

* ``L_dir`` (not in the paper; off by default, ``zeta`` 0): a push of the unsafe states along a fixed
  direction of the ORIGINAL model instead of in any direction. Before the first step (:meth:`RepBend.prepare`)
  ``d_l = normalize(mean h^R_l(harmful) - mean h^R_l(safe))`` at the last request token of up to
  ``direction_rows`` unsafe rows and of up to ``direction_rows`` safe rows of the kinds
  ``direction_safe_kinds`` (benign and over-refusal-like requests; not the refusal rows, whose requests are
  harmful) — the difference of means a linear probe reads harmfulness along. Then
  ``L_dir = mean_{l in target} mean_{(b,t) in M_dir} min((h^P_l - h^R_l) . d_l, m_d ||h^R_l||_2)`` on the
  unsafe rows, ``M_dir`` = ``direction_token_mode``'s tokens, ``m_d`` = ``direction_margin`` (null: no cap).
  It enters with a minus sign: states move further along the direction that already separates harmful from
  safe requests, which a network can do by amplifying that feature, i.e. also for harmful requests it was
  not trained on; ``L_safe`` holds the safe rows where they were.

* ``steer_state`` (not in the paper; off by default): training against activation steering. ``prepare`` also takes
  ``s = -steer_coefficient * (mean h^R_k(harmful) - mean h^R_k(safe))`` at hidden state ``k = steer_state`` (same rows
  as L_dir), and every pass over the unsafe rows (policy and reference) adds ``s`` to hidden state ``k`` at every
  position — the `steering` attack's shift. L_unsafe / L_cos / L_dir then act on the steered unsafe rows: the bent
  layers above ``k`` must disrupt harmful requests even when a steer has moved them to the safe mean at ``k``.
  ``steer_fraction`` < 1 steers only that share of the unsafe rows (picked by a hash of each row's tokens); the rest
  are bent unsteered.

* ``L_NLL`` (not in the paper; off by default, ``nu`` 0): ``mean_{(b,t) in response tokens} -log p^P(x_t | x_<t)`` on the
  rows of ``nll_split``, pooled over all their response tokens. ``safe``: the refusals the safe set pairs with harmful
  requests and the helpful answers of its benign / over-refusal-like rows. ``pair``: for each unsafe row of the step,
  the SAME harmful request with its refusal — a causal model gives the shared request tokens the same (bent) states in
  both rows, so the refusal is learned from the bent states. RepBend only moves states; this term also teaches what
  to say instead (supervised refusal training, as safety fine-tuning does). It needs that split's logits (one
  LM-head pass over its response tokens).

A tiny hand-derived case (one layer, one safe token, hidden size 2): policy (3, 4), reference
(0, 0) -> L_safe = 5. Two unsafe rows with policy last-request states (1, 0) and (0, 1) -> cos = 0
for both ordered pairs -> L_cos = 1. Reference logits (0, 0), policy logits (2 ln 3, 0) at T = 2:
p^R = (1/2, 1/2), p^P = (3/4, 1/4), KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3), times T^2 = 4 ->
L_KL = 2 ln(4/3) = 0.5754.

Divergence guard: ``L_unsafe`` is unbounded. When ``max_unsafe_ratio`` is set and the unsafe distance
exceeds that multiple of the reference states' mean norm on the same tokens, the call raises
:class:`DivergenceError` (the trainer then stops and keeps the last good checkpoint).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from repbend.config import Section
from repbend.errors import DivergenceError, RepbendError
from repbend.methods.base import Method, Need, SeqBatch, States, response_nll

TokenMode = Literal["response_all", "request_last", "request_all", "request_response", "response_first_k"]

# The paper's window (hidden states 20..30 of a 32-block model), used relative to depth when not set.
_PAPER_WINDOW = (20 / 32, 30 / 32)


class RepBendConfig(Section):
    alpha: float = Field(0.5, ge=0, description="Weight of L_safe (keep safe representations where they were).")
    beta: float = Field(0.5, ge=0, description="Weight of L_unsafe (push unsafe representations away; enters with -).")
    gamma: float = Field(0.1, ge=0, description="Weight of L_cos (pull unsafe last-request states together).")
    epsilon: float = Field(0.3, ge=0, description="Weight of L_KL (KL(reference||policy) on retain chat data).")
    eta: float = Field(0.0, ge=0, description="Weight of L_pair (policy on unsafe -> reference on its refusal); 0 = off.")
    token_mode: TokenMode = Field("response_all", description="Tokens whose distances count in L_safe/L_unsafe.")
    safe_token_mode: TokenMode | None = Field(
        None, description="Tokens of L_safe when they should differ from token_mode (null = token_mode). "
                          "E.g. response_all with token_mode request_response: the safe set's refusal rows "
                          "carry HARMFUL requests, whose tokens L_safe would otherwise pin.")
    k: int = Field(20, ge=1, description="Number of response tokens for token_mode response_first_k.")
    safe_layers: Literal["all", "target"] = Field("all", description="Hidden states of L_safe: all (0..L) or target.")
    target_layers: list[int] | None = Field(
        None, description="Hidden-state indices for L_unsafe/L_cos/L_pair (0 = embeddings, L = last block). "
                          "Default: the paper's relative window (20..30 of 32) scaled to the model depth.")
    target_start: int | None = Field(None, ge=0, description="First target hidden-state index (with target_window).")
    target_window: int | None = Field(None, ge=1, description="Number of consecutive target layers from target_start.")
    kl_temperature: float = Field(2.0, gt=0, description="Softmax temperature T of L_KL (scaled by T^2).")
    pair_tokens: int = Field(20, ge=1, description="Response tokens compared by L_pair.")
    unsafe_margin: float | None = Field(
        None, gt=0, description="Cap each unsafe token's distance at this multiple of the reference state's norm "
                                "before averaging (a hinge: tokens already bent that far stop pushing). null = the "
                                "paper's unbounded L_unsafe.")
    unsafe_skip_shared_prefix: bool = Field(
        False, description="Leave out of L_unsafe each unsafe row's leading tokens that a safe/retain row of the "
                           "same step shares token for token (chat-template prefix): their states are the same "
                           "in both rows. Only matters for token modes that include request tokens.")
    zeta: float = Field(0.0, ge=0, description="Weight of L_dir (push unsafe states along the original model's "
                                                "harmful-minus-safe direction; enters with -); 0 = off. Not in the paper.")
    direction_token_mode: TokenMode = Field("request_last", description="Tokens of the unsafe rows that L_dir pushes.")
    direction_safe_kinds: list[str] = Field(
        ["benign", "overrefusal"], min_length=1,
        description="Kinds of safe rows whose mean is the 'safe' end of the L_dir direction (not 'refusal': those "
                    "rows carry harmful requests).")
    direction_rows: int = Field(512, ge=2, description="At most this many rows per side (data-file order) for the "
                                                       "L_dir direction.")
    direction_margin: float | None = Field(
        0.5, gt=0, description="Cap each token's push along the L_dir direction at this multiple of the reference "
                               "state's norm; null = no cap.")
    steer_state: int | None = Field(
        None, ge=1, description="Train against activation steering (not in the paper; null = off): the unsafe rows are "
                                "run, in both passes, with hidden state steer_state shifted by -steer_coefficient x "
                                "(mean harmful - mean safe) of the original's last-request states, so the bent layers "
                                "must disrupt harmful requests that a steer made look harmless there.")
    steer_coefficient: float = Field(1.0, gt=0, description="Strength of the steer_state shift (1 = the harmful mean "
                                                            "moved onto the safe mean).")
    steer_fraction: float = Field(1.0, gt=0, le=1, description="Share of the unsafe rows that get the steer_state "
                                                               "shift (1 = all; the rest are bent as they are). Which "
                                                               "rows is fixed by each row's tokens.")
    nu: float = Field(0.0, ge=0, description="Weight of L_NLL: next-token NLL of the responses of the nll_split rows; "
                                             "0 = off. Not in the paper.")
    nll_split: Literal["safe", "pair"] = Field(
        "safe", description="Rows of L_NLL: safe (refusals to harmful requests and answers to benign ones) or pair "
                            "(each unsafe row's own request with its refusal).")
    max_unsafe_ratio: float | None = Field(
        100.0, gt=0, description="Stop (DivergenceError) when L_unsafe exceeds this multiple of the reference "
                                 "states' mean norm; null disables the guard.")

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
    bad = [i for i in layers if not 0 <= i <= num_layers]
    if bad:
        raise RepbendError(f"{field}: hidden-state indices {bad} are out of range 0..{num_layers} "
                           f"(the model has {num_layers} blocks; 0 = embeddings, {num_layers} = last block).")
    return layers


def token_mask(batch: SeqBatch, mode: str, k: int) -> Tensor:
    """(B, T) bool mask of the tokens selected by ``mode`` (never padding)."""
    attn = batch.attention_mask.bool()
    if mode == "response_all":
        m = batch.response_mask
    elif mode == "request_all":
        m = batch.request_mask
    elif mode == "request_response":
        m = batch.request_mask | batch.response_mask
    elif mode == "response_first_k":
        m = batch.first_response_tokens(k)
    else:  # request_last
        m = torch.zeros_like(attn)
        m[torch.arange(batch.size, device=m.device), batch.last_request_index] = True
    return m.bool() & attn


def shared_prefix_mask(rows: SeqBatch, others: list[SeqBatch]) -> Tensor:
    """(B, T) bool mask of each row's leading tokens that some row of ``others`` has, token for token, at
    the same positions (the longest common prefix with any other row; padding never matches)."""
    ids, attn = rows.input_ids, rows.attention_mask.bool()
    n, width = ids.shape
    best = torch.zeros(n, dtype=torch.long, device=ids.device)
    for o in others:
        w = min(width, o.input_ids.shape[1])
        same = (ids[:, None, :w] == o.input_ids[None, :, :w]) & attn[:, None, :w] & o.attention_mask.bool()[None, :, :w]
        prefix = same.long().cumprod(dim=-1).sum(dim=-1)          # (B, B_other) common-prefix lengths
        best = torch.maximum(best, prefix.max(dim=1).values)
    return torch.arange(width, device=ids.device)[None, :] < best[:, None]


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


def mean_projection(policy: States, reference: States, layers: list[int], mask: Tensor, directions: dict[int, Tensor],
                    cap: float | None = None) -> Tensor:
    """Mean over (layer, selected token) of ``(policy - reference) . d_l``, each capped at
    ``cap * ||reference||_2`` of that token when ``cap`` is set (no lower bound: moving against ``d`` costs)."""
    per_layer = []
    for l in layers:
        ref = reference.hidden[l][mask].float()
        p = (policy.hidden[l][mask].float() - ref) @ directions[l].to(ref.device)
        if cap is not None:
            p = torch.minimum(p, cap * ref.norm(dim=-1))
        per_layer.append(p.mean())
    return torch.stack(per_layer).mean()


def mean_offdiag_one_minus_cos(x: Tensor) -> Tensor:
    """mean_{i != j} (1 - cos(x_i, x_j)) for rows of ``x`` (n, H), n >= 2."""
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    n = x.shape[0]
    cos = x @ x.T
    return (n * (n - 1) - (cos.sum() - cos.diagonal().sum())) / (n * (n - 1))


def kl_ref_policy(policy_logits: Tensor, reference_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * mean over rows of KL(softmax(ref/T) || softmax(policy/T)); inputs (N, V)."""
    log_p = torch.log_softmax(policy_logits.float() / temperature, dim=-1)
    log_r = torch.log_softmax(reference_logits.float() / temperature, dim=-1)
    kl = (log_r.exp() * (log_r - log_p)).sum(-1)
    return kl.mean() * temperature ** 2


def first_k_positions(mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Positions (B, k) of the first ``k`` true entries of each row of ``mask`` and their validity (B, k)."""
    t = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    key = torch.where(mask, t, t + mask.shape[1])
    idx = key.argsort(dim=1)[:, :k]
    return idx, mask.gather(1, idx)


class RepBend(Method):
    """The RepBend loss (see the module docstring for the exact formulas and normalisation)."""

    name = "repbend"
    Config = RepBendConfig

    def __init__(self, config: RepBendConfig, num_layers: int, hidden_size: int):
        super().__init__(config, num_layers, hidden_size)
        self.target = resolve_target_layers(config, num_layers)
        self.safe = list(range(num_layers + 1)) if config.safe_layers == "all" else self.target
        self.safe_mode = config.safe_token_mode or config.token_mode
        self.directions: dict[int, Tensor] | None = None   # L_dir's unit direction per target layer (prepare)
        self.steer_shift: Tensor | None = None              # steer_state's shift vector (prepare)

    def needs(self) -> dict[str, Need]:
        c, t = self.config, tuple(self.target)
        out: dict[str, Need] = {}
        nll_on = c.nll_split if c.nu > 0 else None
        if c.alpha > 0 or nll_on == "safe":
            out["safe"] = Need(layers=tuple(self.safe) if c.alpha > 0 else (), reference=c.alpha > 0,
                               logits=nll_on == "safe")
        if c.beta > 0 or c.gamma > 0 or c.eta > 0 or c.zeta > 0:
            shift = {c.steer_state: self.steer_shift} if self.steer_shift is not None else None
            out["unsafe"] = Need(layers=t, reference=c.beta > 0 or c.zeta > 0, shift=shift,
                                 shift_fraction=c.steer_fraction)
        if c.epsilon > 0:
            out["retain"] = Need(logits=True, reference=True)
        if c.eta > 0 or nll_on == "pair":
            out["pair"] = Need(layers=t if c.eta > 0 else (), reference=c.eta > 0, policy=nll_on == "pair",
                               logits=nll_on == "pair")
        return out

    def trainable_layers(self) -> list[int] | None:
        """Blocks 0..max(target) (0-based), as the reference code's "layers up to the last target layer"."""
        return list(range(min(max(self.target) + 1, self.num_layers)))

    def prepare(self, reference_states) -> None:
        """Differences of the reference's mean last-request states, harmful - safe: L_dir's directions (zeta > 0) and
        the steer_state shift."""
        c = self.config
        if c.zeta <= 0 and c.steer_state is None:
            return
        if c.steer_state is not None and not 1 <= c.steer_state <= self.num_layers - 1:
            raise RepbendError(f"method.params.steer_state {c.steer_state} is out of range 1..{self.num_layers - 1} "
                               f"(block outputs of this {self.num_layers}-block model).")
        layers = sorted(set(self.target) | ({c.steer_state} if c.steer_state is not None else set()))
        need = Need(layers=tuple(layers), reference=True)
        means = {}
        # the safe side first: a kind the data lacks fails before the longer unsafe pass
        for side, split, kinds in (("safe", "safe", c.direction_safe_kinds), ("unsafe", "unsafe", None)):
            sums, n = {l: torch.zeros(self.hidden_size, dtype=torch.float64) for l in layers}, 0
            for rows, st in reference_states(split, kinds, need, request_only=True):
                take = min(rows.size, c.direction_rows - n)
                if take <= 0:
                    break
                idx = torch.arange(take, device=rows.input_ids.device)
                for l in layers:
                    sums[l] += st.hidden[l][idx, rows.last_request_index[:take]].double().sum(0).cpu()
                n += take
            if n == 0:
                what = f"safe rows of kind {', '.join(c.direction_safe_kinds)}" if side == "safe" else "unsafe rows"
                raise RepbendError(f"L_dir / steer_state need {what} in the training data to find their direction; "
                                   f"set method.params.direction_safe_kinds to kinds the data has, or turn them off.")
            means[side] = {l: v / n for l, v in sums.items()}
        if c.steer_state is not None:
            l = c.steer_state
            self.steer_shift = (-c.steer_coefficient * (means["unsafe"][l] - means["safe"][l])).float()
        if c.zeta <= 0:
            return
        self.directions = {}
        for l in self.target:
            diff = means["unsafe"][l] - means["safe"][l]
            if float(diff.norm()) == 0.0:
                raise RepbendError(f"L_dir: the harmful and safe mean states are identical at hidden state {l}; "
                                   f"there is no direction to push along (check the data), or set zeta 0.")
            self.directions[l] = (diff / diff.norm()).float()

    def check_batch(self, batch: dict[str, SeqBatch]) -> None:
        c = self.config
        needs = self.needs()
        for split in needs:
            if split not in batch or batch[split].size == 0:
                raise RepbendError(f"The batch has no {split!r} rows but the repbend loss needs them "
                                   f"(alpha/beta/gamma/epsilon/eta/zeta/nu > 0); add {split} rows to the data or set that "
                                   f"weight to 0.")
        for split in ("safe", "unsafe"):
            mode, field = (self.safe_mode, "safe_token_mode") if split == "safe" else (c.token_mode, "token_mode")
            if split in batch and (c.alpha if split == "safe" else c.beta) > 0 \
                    and not token_mask(batch[split], mode, c.k).any():
                raise RepbendError(f"{field} {mode!r} selects no tokens in the {split!r} rows "
                                   f"(e.g. rows without responses); pick another method.{field} or fix the data.")
        if c.nu > 0 and not batch[c.nll_split].response_mask[:, 1:].any():
            raise RepbendError(f"L_NLL (nu > 0) found no response tokens in the {c.nll_split} rows; rebuild the data "
                               f"with responses or set method.params.nu 0.")
        if c.gamma > 0 and batch["unsafe"].size < 2:
            raise RepbendError("L_cos needs at least 2 unsafe rows per batch; raise the unsafe batch size or set gamma 0.")
        if "pair" in needs and batch["pair"].size != batch["unsafe"].size:
            raise RepbendError("The pair split must have one refusal row per unsafe row (same pair_id).")

    def __call__(self, batch: dict[str, SeqBatch], policy: dict[str, States], reference: dict[str, States],
                 progress: float) -> tuple[Tensor, dict[str, float]]:
        c = self.config
        self.check_batch(batch)
        if c.steer_state is not None and self.steer_shift is None:
            raise RepbendError("steer_state is set but its shift was not computed: call prepare() before the loss (the "
                               "trainer does this before the first step).")
        loss = torch.zeros((), device=batch[next(iter(batch))].input_ids.device)
        parts: dict[str, float] = {}
        if c.alpha > 0:
            m = token_mask(batch["safe"], self.safe_mode, c.k)
            l_safe = mean_l2(policy["safe"], reference["safe"], self.safe, m)
            loss = loss + c.alpha * l_safe
            parts["loss/safe"] = l_safe.item()
        if c.beta > 0:
            m = token_mask(batch["unsafe"], c.token_mode, c.k)
            if c.unsafe_skip_shared_prefix:
                others = [batch[s] for s in ("safe", "retain") if s in batch]
                kept = m & ~shared_prefix_mask(batch["unsafe"], others)
                m = kept if kept.any() else m   # never an empty mask (a mean over no tokens is NaN)
                parts["unsafe_tokens"] = float(m.sum())
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
            l_kl = kl_ref_policy(policy["retain"].logits_at(m), reference["retain"].logits_at(m), c.kl_temperature)
            loss = loss + c.epsilon * l_kl
            parts["loss/kl"] = l_kl.item()
        if c.zeta > 0:
            if self.directions is None:
                raise RepbendError("L_dir (zeta > 0) has no direction: call prepare() before the loss (the trainer "
                                   "does this before the first step).")
            m = token_mask(batch["unsafe"], c.direction_token_mode, c.k)
            l_dir = mean_projection(policy["unsafe"], reference["unsafe"], self.target, m, self.directions,
                                    cap=c.direction_margin)
            loss = loss - c.zeta * l_dir
            parts["loss/dir"] = l_dir.item()
        if c.nu > 0:
            l_nll = response_nll(policy[c.nll_split], batch[c.nll_split])
            loss = loss + c.nu * l_nll
            parts["loss/nll"] = l_nll.item()
        if c.eta > 0:
            l_pair = self._pair(batch, policy["unsafe"], reference["pair"])
            loss = loss + c.eta * l_pair
            parts["loss/pair"] = l_pair.item()
        return loss, parts

    def _pair(self, batch: dict[str, SeqBatch], pol: States, ref: States) -> Tensor:
        k = min(self.config.pair_tokens, batch["unsafe"].input_ids.shape[1], batch["pair"].input_ids.shape[1])
        iu, vu = first_k_positions(batch["unsafe"].response_mask, k)
        ip, vp = first_k_positions(batch["pair"].response_mask, k)
        valid = vu & vp
        if not valid.any():
            raise RepbendError("L_pair found no response tokens in the unsafe/pair rows; set eta 0 or fix the data.")
        rows = torch.arange(iu.shape[0], device=iu.device)[:, None].expand_as(iu)
        return torch.stack([(pol.hidden[l][rows, iu][valid].float() - ref.hidden[l][rows, ip][valid].float())
                            .norm(dim=-1).mean() for l in self.target]).mean()

    def _guard(self, l_unsafe: Tensor, ref: States, mask: Tensor) -> None:
        limit = self.config.max_unsafe_ratio
        if limit is None:
            return
        scale = torch.stack([ref.hidden[l][mask].float().norm(dim=-1).mean() for l in self.target]).mean()
        if float(l_unsafe.detach()) > limit * float(scale):
            raise DivergenceError(
                f"L_unsafe = {float(l_unsafe.detach()):.4g} exceeds max_unsafe_ratio {limit:g} x the reference norm "
                f"{float(scale):.4g}: the unsafe representations are exploding; lower method.beta or the learning "
                f"rate, or raise method.max_unsafe_ratio.")
