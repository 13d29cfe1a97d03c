"""Chat-template-generic segmentation of (messages, response) into request and response tokens.

Nothing here knows a role tag or a token offset. The request/response boundary is found by rendering
the conversation twice with the tokenizer's OWN chat template:

* the prompt: ``messages`` with ``add_generation_prompt=True`` (exactly what generation sees), and
* the full conversation: ``messages + [{"role": "assistant", "content": response}]``,

and comparing them. In the usual case the prompt's tokens are a prefix of the full conversation's
tokens and the boundary is that prefix length. Two fallbacks cover templates where that fails:

1. the full text starts with the prompt text but the tokens differ at the seam (a merge across the
   boundary): the request is the prompt's own tokens and the rest of the text is tokenized on its own;
2. the full text does not start with the prompt text (a template that renders the generation prompt
   differently from a finished turn): the response is located by character offset in the full text
   (its last occurrence, after the template's trimming) and the text is split at that character
   offset, each side tokenized on its own (so no token straddles the boundary).

Trailing template text after the end-of-turn token (e.g. ChatML's ``"\\n"`` after ``<|im_end|>``) is
not part of the response: whitespace-only tokens that follow a special token at the end are dropped.
So the response tokens decode to the response text followed by the template's end-of-turn token
(``encode(..., end_of_turn=False)``: the response text only, as the published RepBend data).

Truncation (choices):

* an over-long request keeps its LAST ``max_request_tokens`` tokens so the generation prompt (the
  assistant header the model answers after) survives; a leading BOS token is kept as well;
* an over-long response keeps its FIRST ``max_response_tokens`` tokens (its end-of-turn is then lost).

Rendering itself (:func:`render_prompt`, :func:`prompt_ids`, the opt-in :data:`FALLBACK_TEMPLATE`) lives in
:mod:`repbend.models.chat`, below the data layer, and is re-exported here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from repbend.errors import RepbendError
from repbend.methods.base import SeqBatch
from repbend.models.chat import (FALLBACK_TEMPLATE, check_messages, text_ids, render, prompt_ids, render_prompt,
                                 use_fallback_template)

__all__ = ["FALLBACK_TEMPLATE", "Encoded", "collate", "encode", "encode_batch", "prompt_ids", "render_prompt",
           "use_fallback_template"]

@dataclass
class Encoded:
    """One tokenized conversation: ``input_ids[:request_len]`` is the request, the rest the response."""

    input_ids: list[int]
    request_len: int
    response_len: int
    truncated_request: bool = False
    truncated_response: bool = False

    def __post_init__(self) -> None:
        if self.request_len + self.response_len != len(self.input_ids):
            raise ValueError("request_len + response_len must equal len(input_ids)")


def _split(tokenizer, prompt_text: str, full_text: str, response: str) -> tuple[list[int], list[int]]:
    """Split the full conversation into (request ids, response ids) — see the module docstring."""
    p_ids, f_ids = text_ids(tokenizer, prompt_text), text_ids(tokenizer, full_text)
    if f_ids[: len(p_ids)] == p_ids:
        return p_ids, f_ids[len(p_ids):]
    if full_text.startswith(prompt_text):
        return p_ids, text_ids(tokenizer, full_text[len(prompt_text):])
    # The generation prompt is rendered differently from a finished turn: locate the response by offset.
    needle = response.strip()
    start = full_text.rfind(needle) if needle else -1
    if start < 0:
        raise RepbendError("Cannot find the response in the rendered conversation: the chat template changes "
                           "the assistant text; use a template that keeps the answer verbatim.")
    return text_ids(tokenizer, full_text[:start]), text_ids(tokenizer, full_text[start:])


def _drop_template_tail(tokenizer, resp: list[int]) -> list[int]:
    """Drop whitespace-only tokens that follow a special (end-of-turn) token at the end of the response."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    end = len(resp)
    while end > 0 and resp[end - 1] not in special and not tokenizer.decode(resp[end - 1:end]).strip():
        end -= 1
    if 0 < end < len(resp) and resp[end - 1] in special:
        return resp[:end]
    return resp


def encode(tokenizer, messages: Sequence[dict], response: str | None = None, *, max_request_tokens: int = 512,
           max_response_tokens: int = 512, end_of_turn: bool = True) -> Encoded:
    """Tokenize ``messages`` (+ the assistant ``response``) with the tokenizer's chat template.

    Without ``response`` the result is the generation prompt alone (``response_len == 0``). ``end_of_turn=False``
    drops the template's end-of-turn token(s) (special tokens) that close the response, so the response tokens
    are the answer text only.
    """
    if max_request_tokens < 1 or max_response_tokens < 0:
        raise RepbendError("max_request_tokens must be >= 1 and max_response_tokens >= 0.")
    msgs = check_messages(messages)
    prompt_text = render(tokenizer, msgs, add_generation_prompt=True)
    if response is None:
        req, resp = text_ids(tokenizer, prompt_text), []
    else:
        if not isinstance(response, str):
            raise RepbendError(f"response must be a string, got {type(response).__name__}.")
        full_text = render(tokenizer, msgs + [{"role": "assistant", "content": response}], add_generation_prompt=False)
        req, resp = _split(tokenizer, prompt_text, full_text, response)
        resp = _drop_template_tail(tokenizer, resp)
        if not end_of_turn:
            special = set(getattr(tokenizer, "all_special_ids", []) or [])
            while resp and resp[-1] in special:
                resp = resp[:-1]
    if not req:
        raise RepbendError("The chat template rendered an empty prompt; check the tokenizer's chat template.")
    cut_req = len(req) > max_request_tokens
    if cut_req:
        bos = getattr(tokenizer, "bos_token_id", None)
        keep_bos = bos is not None and req[0] == bos and max_request_tokens > 1
        req = ([bos] if keep_bos else []) + req[len(req) - (max_request_tokens - keep_bos):]
    cut_resp = len(resp) > max_response_tokens
    resp = resp[:max_response_tokens]
    return Encoded(req + resp, len(req), len(resp), cut_req, cut_resp)


def collate(items: Sequence[Encoded], pad_id: int, padding_side: str = "right") -> SeqBatch:
    """Pad encoded items into a :class:`SeqBatch` (masks are correct for either padding side)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    if not items:
        raise ValueError("collate needs at least one item")
    if pad_id is None:
        raise RepbendError("The tokenizer has no pad token; load it with repbend.models.load_model (sets pad = eos).")
    width = max(len(e.input_ids) for e in items)
    n = len(items)
    ids = torch.full((n, width), int(pad_id), dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    req = torch.zeros((n, width), dtype=torch.bool)
    resp = torch.zeros((n, width), dtype=torch.bool)
    last = torch.zeros(n, dtype=torch.long)
    for i, e in enumerate(items):
        if e.request_len < 1:
            raise ValueError("every item needs at least one request token")
        off = width - len(e.input_ids) if padding_side == "left" else 0
        end = off + len(e.input_ids)
        ids[i, off:end] = torch.tensor(e.input_ids, dtype=torch.long)
        attn[i, off:end] = 1
        req[i, off:off + e.request_len] = True
        resp[i, off + e.request_len:end] = True
        last[i] = off + e.request_len - 1
    return SeqBatch(ids, attn, req, resp, last)


def encode_batch(tokenizer, rows: Sequence[dict[str, Any]], *, padding_side: str = "right",
                 max_request_tokens: int = 512, max_response_tokens: int = 512) -> SeqBatch:
    """Convenience: encode rows ``{"messages": [...], "response": str | None}`` and collate them."""
    items = [encode(tokenizer, r["messages"], r.get("response"), max_request_tokens=max_request_tokens,
                    max_response_tokens=max_response_tokens) for r in rows]
    return collate(items, tokenizer.pad_token_id, padding_side)
