"""One forward pass over several splits -> ``States`` per split, keeping only what the method needs.

The model is called through its (possibly DDP/DeepSpeed-wrapped) causal-LM forward with
``output_hidden_states=True`` and ``logits_to_keep=1``: the LM head then runs on ONE position per row,
and :meth:`States.logits_at` applies the head later only where the method asks (e.g. the non-padding
retain tokens). Hidden states the method does not need are dropped right after the pass (a no-grad
reference pass therefore holds only the requested layers). With parameter sharding (FSDP, ZeRO-3)
the head cannot be called outside the wrapped forward, so ``full_logits=True`` computes (B, T, V)
logits inside it for the splits that need them (more memory, same numbers).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from repbend.methods.base import Need, SeqBatch, States
from repbend.training.data import select_rows

Groups = list[tuple[SeqBatch, dict[str, slice]]]


def head_fn(lm_head: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """The LM head as a function that casts its input to the head's dtype (autocast-safe)."""
    weight = getattr(lm_head, "weight", None)

    def apply(x: Tensor) -> Tensor:
        return lm_head(x.to(weight.dtype) if weight is not None else x)

    return apply


def forward_states(model, batch: SeqBatch, spans: dict[str, slice], needs: dict[str, Need],
                   head: Callable[[Tensor], Tensor], full_logits: bool = False) -> dict[str, States]:
    """Run ``model`` once over the rows of the splits in ``needs``; return ``{split: States}``."""
    if not needs:
        return {}
    sub, sub_spans = select_rows(batch, spans, list(needs))
    want_logits = any(n.logits for n in needs.values())
    out = model(input_ids=sub.input_ids, attention_mask=sub.attention_mask, output_hidden_states=True,
                use_cache=False, logits_to_keep=0 if (full_logits and want_logits) else 1)
    hidden = out.hidden_states
    states = {}
    for split, need in needs.items():
        sl = sub_spans[split]
        st = States(hidden={l: hidden[l][sl] for l in need.layers})
        if need.logits:
            if full_logits:
                st.final, st.head = out.logits[sl], (lambda x: x)
            else:
                st.final, st.head = hidden[-1][sl], head
        states[split] = st
    del out, hidden
    return states


def forward_groups(model, groups: Groups, needs: dict[str, Need], head: Callable[[Tensor], Tensor],
                   full_logits: bool = False) -> dict[str, States]:
    """:func:`forward_states` once per ``(batch, spans)`` group (:func:`repbend.training.data.collate_groups`),
    over the splits of that group in ``needs``; the states of every split, each at its group's width."""
    states: dict[str, States] = {}
    for batch, spans in groups:
        states.update(forward_states(model, batch, spans, {s: n for s, n in needs.items() if s in spans}, head,
                                     full_logits))
    return states
