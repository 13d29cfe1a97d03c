"""The one interface every training method implements.

A method is maths only: no model loading, no I/O. The trainer asks it what it needs
(:meth:`Method.needs`), runs at most ONE forward pass with gradients over all requested splits
concatenated (the policy) and at most ONE no-grad pass over the splits that need the frozen
reference (LoRA: same network, adapter disabled; full fine-tuning: a frozen copy), and then calls
``loss, parts = method(batch, policy, reference, progress)``.

Hidden-state indexing (the Hugging Face ``output_hidden_states`` convention, documented in
docs/TRAINING.md): index 0 is the embedding output, index i (1 <= i < L) is the output of decoder
block i, and index L (= ``num_layers``) is the output of the LAST block AFTER the final norm, i.e.
the state the LM head reads. There are ``L + 1`` hidden states.

Splits a method may ask for (the data loader produces exactly the requested ones, aligned row-wise):

- ``safe``: benign request + helpful answer, or harmful request + refusal;
- ``unsafe``: harmful request + harmful (complying) answer;
- ``retain``: ordinary chat (KL / NLL anchor);
- ``pair``: for each ``unsafe`` row, the SAME harmful request with a refusal (row i <-> unsafe row i).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal

import torch
from torch import Tensor

from repbend.config import Section
from repbend.layers import check_layers  # noqa: F401 (the one range check; methods import it from here)
from repbend.registry import Registry

SPLITS = ("safe", "unsafe", "retain", "pair")
TokenMode = Literal["response_all", "request_last", "request_all", "request_response", "response_first_k"]


@dataclass
class SeqBatch:
    """A padded batch of (request, response) sequences with masks. Shapes: (B, T) and (B,)."""

    input_ids: Tensor            # long (B, T)
    attention_mask: Tensor       # long/bool (B, T): 1 = real token, 0 = padding
    request_mask: Tensor         # bool (B, T): tokens of the prompt (chat template included)
    response_mask: Tensor        # bool (B, T): tokens of the assistant answer (and its end-of-turn, unless dropped)
    last_request_index: Tensor   # long (B,): position of the last request token (where generation starts)

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device) -> "SeqBatch":
        return SeqBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.request_mask,
                                                   self.response_mask, self.last_request_index)))

    def first_response_tokens(self, k: int) -> Tensor:
        """Mask of the first ``k`` response tokens of each row."""
        rank = torch.cumsum(self.response_mask.long(), dim=1)
        return self.response_mask & (rank <= k)


@dataclass(frozen=True)
class Need:
    """What a method needs from one split."""

    layers: tuple[int, ...] = ()   # hidden-state indices to keep (see module docstring)
    logits: bool = False           # True -> States.logits_at() is available
    reference: bool = False        # also compute these from the frozen reference model (no grad)
    policy: bool = True            # compute these from the trained model (False: reference-only split, e.g. `pair`)


@dataclass
class States:
    """Outputs of one forward pass for one split."""

    hidden: dict[int, Tensor] = field(default_factory=dict)   # layer index -> (B, T, H)
    final: Tensor | None = None                                # (B, T, H) post-norm last state (for logits)
    head: Callable[[Tensor], Tensor] | None = None             # LM head: (N, H) -> (N, V)

    def logits_at(self, mask: Tensor) -> Tensor:
        """Logits (N, V) only at the positions selected by ``mask`` (B, T) — never the full (B, T, V)."""
        if self.final is None or self.head is None:
            raise RuntimeError("logits were not requested for this split (set Need(logits=True))")
        return self.head(self.final[mask]).float()

    def next_token_logprobs(self, input_ids: Tensor, target_mask: Tensor) -> Tensor:
        """Log-probability of each token selected by ``target_mask`` given its prefix; returns (N,) in row order.

        Position t's token is predicted from the state at t-1, so the mask is shifted left by one.
        """
        pred_mask = torch.zeros_like(target_mask)
        pred_mask[:, :-1] = target_mask[:, 1:]
        logits = self.logits_at(pred_mask)
        targets = input_ids[:, 1:][target_mask[:, 1:]]
        return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


class Method:
    """Base class. Subclasses set ``name`` and ``Config`` and implement ``needs`` and ``__call__``.

    ``Config`` is the method's typed config (a :class:`Section` with ``name: Literal[<name>]``); the training
    config's ``method.params`` is a union of every registered method's ``Config``, told apart by ``name``.
    The trainer calls :meth:`check_batch` once per step, before the passes; ``__call__`` does not repeat it.

    ``num_layers`` is the model's number of decoder blocks L (so hidden-state indices are 0..L).
    """

    name: ClassVar[str]
    Config: ClassVar[type[Section]]

    def __init__(self, config: Section, num_layers: int, hidden_size: int):
        self.config = config
        self.num_layers = num_layers
        self.hidden_size = hidden_size

    def needs(self) -> dict[str, Need]:
        raise NotImplementedError

    def check_batch(self, batch: dict[str, SeqBatch]) -> None:
        """Raise RepbendError when the batch cannot give a meaningful loss (e.g. no unsafe rows)."""

    def trainable_layers(self) -> list[int] | None:
        """Decoder blocks (0-based) whose parameters may change; ``None`` = whatever the LoRA/FT config says."""
        return None

    def __call__(self, batch: dict[str, SeqBatch], policy: dict[str, States], reference: dict[str, States],
                 progress: float) -> tuple[Tensor, dict[str, float]]:
        """Return the scalar loss and its logged parts (``{"loss/safe": ..., ...}``). ``progress`` in [0, 1]."""
        raise NotImplementedError


METHODS: Registry[type[Method]] = Registry("method")


def response_nll(states: States, batch: SeqBatch) -> Tensor:
    """Mean next-token negative log-likelihood over every response token of ``batch`` (pooled over rows); 0 when
    there are none."""
    lp = states.next_token_logprobs(batch.input_ids, batch.response_mask.bool())
    return -lp.sum() / max(lp.numel(), 1)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` (B, T) over positions where ``mask`` (B, T) is true; 0 when nothing is selected."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


def require_rows(batch: dict[str, SeqBatch], split: str, method: str, why: str) -> None:
    """RepbendError when ``batch`` has no rows of ``split`` (the method needs them for ``why``)."""
    from repbend.errors import RepbendError

    if split not in batch or batch[split].size == 0:
        raise RepbendError(f"The batch has no {split!r} rows but {method} needs them for {why}; "
                           f"add {split} rows to the data or change the method config.")


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


def kl_ref_policy(policy_logits: Tensor, reference_logits: Tensor, temperature: float, rows: int | None = None) -> Tensor:
    """T^2 * KL(softmax(ref/T) || softmax(policy/T)) over (N, V) logits: summed and divided by ``rows`` (the
    published batchmean), or averaged over the N positions when ``rows`` is None. The reference is a constant.

    Computed as ``sum p_r log p_r`` (no gradient) plus the cross-entropy of the policy against the soft target
    ``p_r`` (one fused log-softmax, and a backward of ``softmax(policy/T) - p_r``): the same value, fewer passes
    over the (N, 49k) tensors than ``p_r * (log p_r - log p_policy)`` with its autograd graph."""
    import torch.nn.functional as F

    with torch.no_grad():
        log_r = torch.log_softmax(reference_logits.detach().float() / temperature, dim=-1)
        p_r = log_r.exp()
        neg_entropy = (p_r * log_r).sum(-1)
    kl = neg_entropy + F.cross_entropy(policy_logits.float() / temperature, p_r, reduction="none")
    return (kl.mean() if rows is None else kl.sum() / rows) * temperature ** 2
