"""Batched generation: chat template, optional prefill, left padding, KV cache.

Prompts are sorted by length (longest first, so a batch that does not fit in memory fails at once) and cut
into batches of at most ``batch_size`` by :func:`length_batches` (a few long prompts get a batch of their own
rather than padding every short one to their length); the answers are returned in input order. Works for
plain transformers models and PEFT models.

Engines (``engine=``):

* ``"loop"`` (default): the prompt pass in passes of at most :data:`PREFILL_CHUNK_TOKENS` padded tokens, its
  keys/values copied into buffers with room for the answer (:func:`_prefill`), then one decode pass per new
  token that writes its keys/values in place (a transformers ``DynamicCache`` whose layers are
  ``BufferLayer``s: no concatenation of the whole cache per step), feeding exactly the inputs
  ``model.generate`` feeds (2-D mask, position ids from the mask, last-position logits only). Rows that have
  ended are dropped from the batch with their cache rows once a quarter of the batch has ended
  (:data:`COMPACT_FRACTION`), so the remaining rows stop paying for them without copying the cache at every
  ending, and there is no per-step logits-processor / stopping-criteria machinery. The tokens every row of a
  batch starts with (the chat template's system turn: 24 of a ~45-token request on the default model) run once,
  as one row, and their keys/values are copied to every row (:func:`shared_prefix`, ``share_prefix=``; the
  field's prefix caching, within a batch). Greedy answers equal ``"hf"``'s up
  to floating point (a smaller batch may round differently and flip a near-tie;
  ``benchmarks/bench_generation.py`` measures the agreement).
* ``"cb"``: continuous batching on the same loop: ``batch_size`` slots over ALL requests of the call;
  when a quarter of the slots have ended, the next requests are prefilled and merged into the running
  cache (left-padded; columns no row needs any more are trimmed), so the batch stays full instead of
  waiting for its longest answer. Same agreement caveat as ``"loop"``. Needs plain ``DynamicLayer``
  caches (no sliding window); other models fall back to ``"loop"``.
* ``"hf"``: ``model.generate`` (every row runs until the batch's longest answer ends).

The default is ``"loop"``: on the quick suite's greedy requests it gave the same 288 answers as ``"hf"`` and
1.17x its new tokens/s at batch 64 on a 2-core CPU, 1.35x on the obfuscation attack's longer prompts
(``benchmarks/bench_generation.py``, docs/PERFORMANCE.md). ``REPBEND_GENERATION_ENGINE`` or ``engine=`` picks
another.

Requests longer than the model's context (``max_position_embeddings`` minus ``max_new_tokens``) are
cut before generation, keeping the END of the longest message (the question usually comes last) and the
chat template around it intact, with a warning: an unbounded prompt would otherwise try to allocate
attention for the whole text.

Determinism:

* greedy decoding (``do_sample=False``) is deterministic; ``num_samples`` copies of it are generated once;
* sampling draws each row's tokens from its OWN random generator, seeded from ``seed``, the rendered
  prompt and the sample index. So a given (conversation, prefill, seed, sample) gets the same answer
  whatever else is in the call, its position, the batch size or the global RNG state — up to floating
  point: padding changes the batch's arithmetic by rounding error, which can flip a near-tie between
  two tokens. Across devices/dtypes/library versions answers are NOT guaranteed to match.

Returned texts are the new tokens only (without the prompt or the prefill), decoded without special
tokens and ending at the first end-of-sequence token.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import math
import os
import warnings
from typing import Callable, Sequence

import torch

from repbend.models.chat import prompt_ids
from repbend.errors import RepbendError


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows padded on the left to the longest: ``(ids, attention_mask)``, both long (B, T)."""
    width = max(len(q) for q in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, q in enumerate(seqs):
        ids[r, width - len(q):] = torch.tensor(q, dtype=torch.long)
        mask[r, width - len(q):] = 1
    return ids, mask


def _row_seed(seed: int, ids: list[int], sample: int) -> int:
    h = hashlib.sha256(f"{seed}|{sample}|{','.join(map(str, ids))}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class _RowSampler:
    """A logits processor that samples each row with its own generator (temperature + nucleus).

    It returns scores that are ``0`` at the drawn token and ``-inf`` elsewhere, so the greedy step of
    ``model.generate`` picks exactly the token drawn here.
    """

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float):
        self.generators, self.temperature, self.top_p = generators, temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            drop = cum - torch.softmax(sorted_logits, dim=-1) >= self.top_p  # keep the smallest set reaching top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        probs = torch.softmax(logits, dim=-1).cpu()
        picks = [int(torch.multinomial(probs[i], 1, generator=g)) for i, g in enumerate(self.generators)]
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(picks)), torch.tensor(picks, device=scores.device)] = 0.0
        return out


def _as_messages(conv) -> list[dict]:
    if isinstance(conv, str):
        return [{"role": "user", "content": conv}]
    return list(conv)


def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(x) for x in src)
    return sorted(ids)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


ENGINES = ("loop", "cb", "hf")
DEFAULT_ENGINE = "loop"    # chunked prefill + in-place KV cache: 1.17x "hf" on the quick suite (docs/PERFORMANCE.md)
ENGINE_ENV = "REPBEND_GENERATION_ENGINE"   # overrides the default engine (e.g. hf to compare with model.generate)


def context_limit(model) -> int | None:
    """The model's context length in tokens (``max_position_embeddings``), None when it does not say."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def fit_prompt(tokenizer, messages: list[dict], prefill: str, limit: int) -> tuple[list[int], bool]:
    """Prompt ids of at most ``limit`` tokens: the longest message's text is cut from its START (its end, the
    chat template and the other messages stay) until the rendered prompt fits; returns ``(ids, was_cut)``."""
    ids = prompt_ids(tokenizer, messages, prefill)
    if len(ids) <= limit:
        return ids, False
    msgs = [dict(m) for m in messages]
    for _ in range(8):  # re-rendering can shift a token or two at the cut: a few rounds converge
        over = len(ids) - limit
        if over <= 0:
            return ids, True
        j = max(range(len(msgs)), key=lambda k: len(msgs[k].get("content") or ""))
        text = msgs[j].get("content") or ""
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = len(toks) - over - 2
        if keep <= 0:
            raise RepbendError(f"A request cannot be cut to the model's context of {limit} tokens (its chat "
                               f"template and prefill alone are longer); shorten the prefill or system prompt.")
        msgs[j]["content"] = tokenizer.decode(toks[-keep:], skip_special_tokens=True)
        ids = prompt_ids(tokenizer, msgs, prefill)
    if len(ids) > limit:  # pragma: no cover - pathological tokenizer: cut the ids' middle as a last resort
        ids = ids[:limit // 2] + ids[len(ids) - (limit - limit // 2):]
    return ids, True


# Fixed cost of one decode step in prompt-token equivalents (a CPU decode step of the default model costs about as
# much as prefilling 40 tokens, whatever the batch; docs/PERFORMANCE.md): a batch of its own costs
# max_new_tokens x this, against the padding it saves.
STEP_OVERHEAD_TOKENS = 40


def length_batches(lengths: Sequence[int], batch_size: int, max_new_tokens: int) -> list[tuple[int, int]]:
    """Consecutive ``(start, end)`` batches of prompts sorted longest first (``lengths``), at most ``batch_size``
    each, that minimise the padded prompt tokens (rows x the batch's longest prompt) plus ``max_new_tokens x
    STEP_OVERHEAD_TOKENS`` per batch: an exact dynamic programme. Prompts of similar length fill whole batches;
    a few long ones (HarmBench's contextual behaviours: 300-700 tokens) get a batch of their own instead of
    padding every short prompt to their length."""
    n, extra = len(lengths), max_new_tokens * STEP_OVERHEAD_TOKENS
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - batch_size), j):
            cost = best[i] + lengths[i] * (j - i) + extra
            if cost <= best[j]:     # ties: the shorter last batch, so equal lengths give full batches, then the rest
                best[j], cut[j] = cost, i
    return _walk_back(cut)


def _walk_back(cut: list[int]) -> list[tuple[int, int]]:
    """The ``(start, end)`` groups of a cut table (``cut[j]``: where the best group ending at ``j`` starts)."""
    out, j = [], len(cut) - 1
    while j > 0:
        out.append((cut[j], j))
        j = cut[j]
    return out[::-1]


# Prefill passes of the loop engine hold at most this many (padded) prompt tokens: a 64 x 200-token prefill in one
# pass spends a third of its time in element-wise products over activations far larger than the CPU's caches;
# in passes of ~2k tokens the same prefill is 1.3-1.5x faster with bit-identical logits (docs/PERFORMANCE.md).
PREFILL_CHUNK_TOKENS = 2048


def cheapest_cuts(widths: Sequence[int], weights: Sequence[int], overhead: float) -> list[tuple[int, int]]:
    """``(start, end)`` cuts of items sorted by width (ascending) into consecutive groups that minimise, summed over
    the groups, the group's weight x its widest item plus ``overhead``: an exact dynamic programme (ties keep the
    earlier cut)."""
    n = len(widths)
    total = [0] + list(itertools.accumulate(weights))      # total[j] - total[i] = weight of items i..j-1
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + (total[j] - total[i]) * widths[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    return _walk_back(cut)


def budget_batches(lengths: Sequence[int], max_rows: int, max_tokens: int = PREFILL_CHUNK_TOKENS) -> list[list[int]]:
    """Indices of ``lengths`` sorted by length, cut into consecutive batches of at most ``max_rows`` rows and at
    most ``max_tokens`` padded tokens (rows x the batch's longest; a longer single row gets a batch of its own):
    for passes over whole prompts, where activations beyond the CPU's caches cost more than extra passes."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < max_rows and (len(out[-1]) + 1) * lengths[i] <= max_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


# A batch's rows share their common prompt start (the chat template's system turn and the like) when it is at least
# this many tokens: below that, the extra one-row pass costs about what it saves.
SHARED_PREFIX_MIN_TOKENS = 8


def shared_prefix(rows: Sequence[Sequence[int]], minimum: int = SHARED_PREFIX_MIN_TOKENS) -> int:
    """How many leading tokens all ``rows`` have in common, leaving every row at least one token of its own (its
    last token's logits start the answer); 0 when that is fewer than ``minimum`` or there is one row (nothing to
    share)."""
    if len(rows) < 2:
        return 0
    first, n = rows[0], min(len(r) for r in rows) - 1
    for r in rows[1:]:
        k = 0
        while k < n and r[k] == first[k]:
            k += 1
        n = k
    return n if n >= minimum else 0


@functools.cache
def _dynamic_layer():
    """``(DynamicLayer, BufferLayer)``, defined on first use (transformers is imported lazily)."""
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys and values live in buffers allocated once for the whole answer: each
        decode step writes its token in place instead of concatenating (copying) the whole cache, and
        ``keys``/``values`` are views of the filled part. Same attention inputs, same numbers."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
            super().__init__()
            self.buffers, self.length = [keys, values], length
            self.device, self.is_initialized = keys.device, True
            self._views()

        def _views(self) -> None:
            self.keys, self.values = (b[:, :, :self.length] for b in self.buffers)

        def update(self, key_states, value_states, *args, **kwargs):
            t = key_states.shape[-2]
            if self.length + t > self.buffers[0].shape[-2]:    # longer than planned: grow the buffers
                self.buffers = [torch.cat([b, b.new_empty(*b.shape[:2], max(t, b.shape[-2]), b.shape[-1])], dim=-2)
                                for b in self.buffers]
            for b, x in zip(self.buffers, (key_states, value_states)):
                b[:, :, self.length:self.length + t] = x
            self.length += t
            self._views()
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self.buffers = [b[indices] for b in self.buffers]
            self._views()

    return DynamicLayer, BufferLayer


def _plain_layers(cache) -> bool:
    """Whether ``cache`` is made of plain ``DynamicLayer``s (no sliding window, no shared KV)."""
    DynamicLayer, _ = _dynamic_layer()
    return bool(cache.layers) and all(type(x) is DynamicLayer for x in cache.layers)


def _plain_cache(model) -> bool:
    """Whether ``model``'s cache is made of plain ``DynamicLayer``s (:func:`_plain_layers`)."""
    from transformers import DynamicCache

    return _plain_layers(DynamicCache(config=getattr(model, "config", None)))


def _prefill(model, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, room: int,
             prefix: Sequence[int] = ()):
    """The prompt pass of the loop engine: ``(last-position logits (B, V), cache)``.

    Rows run in passes of at most :data:`PREFILL_CHUNK_TOKENS` padded tokens, and their keys/values are copied
    into buffers with ``room`` free positions per row (:class:`BufferLayer`). Models whose cache is not made of
    plain ``DynamicLayer``s (sliding windows, shared KV) run in one pass over their own cache.

    ``prefix``: tokens every row starts with (:func:`shared_prefix`). They run once, as one row, and their
    keys/values are copied to every row's buffers; ``ids``/``pos`` are then the rows' remaining tokens (left
    padded) and their positions, ``attn`` the mask over prefix and remaining tokens. Plain caches only."""
    from transformers import DynamicCache

    cfg = getattr(model, "config", None)
    _, BufferLayer = _dynamic_layer()
    n, width = ids.shape
    probe = DynamicCache(config=cfg)
    if not _plain_layers(probe):
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, cache=probe, use_cache=True,
                    logits_to_keep=1)
        return out.logits[:, -1, :], probe
    rows = max(1, PREFILL_CHUNK_TOKENS // max(1, width))
    logits, buffers = [], None
    if prefix:
        p = len(prefix)
        head = DynamicCache(config=cfg)
        model(input_ids=torch.tensor([list(prefix)], device=ids.device),
              position_ids=torch.arange(p, device=ids.device)[None], cache=head, use_cache=True, logits_to_keep=1)
        buffers = [[x.new_empty(n, x.shape[1], p + width + room, x.shape[-1]) for x in (layer.keys, layer.values)]
                   for layer in head.layers]
        for bufs, layer in zip(buffers, head.layers):
            for b, x in zip(bufs, (layer.keys, layer.values)):
                b[:, :, :p] = x
        del head
        for s in range(0, n, rows):   # each pass writes its keys/values into its rows of the buffers, in place
            part = DynamicCache(config=cfg)
            part.layers = [BufferLayer(k[s:s + rows], v[s:s + rows], p) for k, v in buffers]
            out = model(input_ids=ids[s:s + rows], attention_mask=attn[s:s + rows], position_ids=pos[s:s + rows],
                        cache=part, use_cache=True, logits_to_keep=1)
            logits.append(out.logits[:, -1, :])
            del part, out
        probe.layers = [BufferLayer(k, v, p + width) for k, v in buffers]
        return torch.cat(logits), probe
    for s in range(0, n, rows):
        part = DynamicCache(config=cfg)
        out = model(input_ids=ids[s:s + rows], attention_mask=attn[s:s + rows], position_ids=pos[s:s + rows],
                    cache=part, use_cache=True, logits_to_keep=1)
        logits.append(out.logits[:, -1, :])
        if buffers is None:
            buffers = [[x.new_empty(n, x.shape[1], width + room, x.shape[-1]) for x in (layer.keys, layer.values)]
                       for layer in part.layers]
        for bufs, layer in zip(buffers, part.layers):
            for b, x in zip(bufs, (layer.keys, layer.values)):
                b[s:s + rows, :, :width] = x
        del part, out
    probe.layers = [BufferLayer(k, v, width) for k, v in buffers]
    return torch.cat(logits), probe


# The loop engine drops ended rows (copying the cache of the others) once at least 1/COMPACT_FRACTION of the batch
# has ended; until then they run along (a 64-row decode step costs ~1.5 ms more per row, a copy of the cache tens).
COMPACT_FRACTION = 4


def _loop_generate(model, ids: torch.Tensor, attn: torch.Tensor, max_new_tokens: int, eos: set[int],
                   sampler: "_RowSampler | None", prefix: Sequence[int] = ()) -> list[list[int]]:
    """Greedy (or per-row sampled) decoding over a preallocated KV cache, dropping finished rows; new ids per row.

    ``prefix``: tokens every row starts with, left out of ``ids``/``attn`` (the rest of each row, left padded);
    their keys/values are computed once (:func:`_prefill`)."""
    n = ids.shape[0]
    if prefix:
        attn = torch.cat([attn.new_ones((n, len(prefix))), attn], dim=-1)
    pos = (attn.long().cumsum(-1) - 1).masked_fill(attn == 0, 0)[:, attn.shape[1] - ids.shape[1]:]
    first, cache = _prefill(model, ids, attn, pos, max_new_tokens, prefix)
    new: list[list[int]] = [[] for _ in range(n)]
    alive = list(range(n))                      # original row of each batch row
    ended = torch.zeros(n, dtype=torch.bool, device=ids.device)   # rows that ended but still fill the batch
    eos_t = torch.tensor(sorted(eos) or [-1], device=ids.device)
    gens = sampler.generators if sampler is not None else None
    for step in range(max_new_tokens):
        logits = first if step == 0 else out.logits[:, -1, :]
        if sampler is not None:
            sampler.generators = [gens[r] for r in alive]
            logits = sampler(None, logits)
        nxt = logits.argmax(dim=-1)
        for b, t, e in zip(alive, nxt.tolist(), ended.tolist()):
            if not e:
                new[b].append(t)
        if step == max_new_tokens - 1:
            break
        ended |= torch.isin(nxt, eos_t)
        n_ended = int(ended.sum())
        if n_ended == len(alive):
            break
        if n_ended * COMPACT_FRACTION >= len(alive):    # drop the ended rows and their cache rows
            idx = (~ended).nonzero().squeeze(-1)
            cache.batch_select_indices(idx)
            alive = [alive[i] for i in idx.tolist()]
            nxt, attn, pos, ended = nxt[idx], attn[idx], pos[idx], ended[idx]
        attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=-1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos, cache=cache, use_cache=True,
                    logits_to_keep=1)
    if sampler is not None:
        sampler.generators = gens
    return new


def _cb_generate(model, prompts: list[list[int]], pad_id: int, slots: int, max_new_tokens: int, eos: set[int],
                 device, gens: list | None, sampler_args: tuple, on_done=None) -> list[list[int]] | None:
    """Continuous batching over ``prompts`` (served in the given order); new ids per prompt, or None when the
    model's cache layers cannot be merged (the caller then uses the plain loop)."""
    from collections import deque

    from transformers import DynamicCache

    cfg = getattr(model, "config", None)
    new: list[list[int]] = [[] for _ in prompts]
    queue = deque(range(len(prompts)))
    eos_t = torch.tensor(sorted(eos) or [-1], device=device)
    cache = attn = pos = nxt = None
    alive: list[int] = []

    def pick(logits, rows):
        if gens is not None:
            logits = _RowSampler([gens[j] for j in rows], *sampler_args)(None, logits)
        return logits.argmax(dim=-1)

    def finished(j, t):
        return t in eos or len(new[j]) >= max_new_tokens

    def layers(c):
        return c.layers if _plain_layers(c) else None

    while queue or alive:
        free = slots - len(alive)
        if queue and (not alive or free >= max(1, slots // 4)):
            take = [queue.popleft() for _ in range(min(free, len(queue)))]
            ids, m = left_pad([prompts[j] for j in take], pad_id)
            ids, m = ids.to(device), m.to(device)
            c2 = DynamicCache(config=cfg)
            p2 = (m.cumsum(-1) - 1).masked_fill(m == 0, 0)
            out = model(input_ids=ids, attention_mask=m, position_ids=p2, cache=c2, use_cache=True, logits_to_keep=1)
            if layers(c2) is None:
                return None
            t2 = pick(out.logits[:, -1, :], take)
            for j, t in zip(take, t2.tolist()):
                new[j].append(t)
            keep = [r for r, j in enumerate(take) if not finished(j, new[j][-1])]
            for r, j in enumerate(take):
                if r not in keep and on_done:
                    on_done(1)
            if keep:
                k = torch.tensor(keep, device=device)
                c2.batch_select_indices(k)
                m, p2, t2 = m[k], p2[k][:, -1:], t2[k]
                if alive:  # merge: left-pad the shorter side, then stack the rows
                    T, W = attn.shape[1], m.shape[1]
                    for a, b in zip(layers(cache), layers(c2)):
                        for name in ("keys", "values"):
                            x, y = getattr(a, name), getattr(b, name)
                            if W > T:
                                x = torch.nn.functional.pad(x, (0, 0, W - T, 0))
                            elif T > W:
                                y = torch.nn.functional.pad(y, (0, 0, T - W, 0))
                            setattr(a, name, torch.cat([x, y], dim=0))
                    L = max(T, W)
                    attn = torch.cat([torch.nn.functional.pad(attn, (L - T, 0)), torch.nn.functional.pad(m, (L - W, 0))])
                    pos, nxt = torch.cat([pos, p2]), torch.cat([nxt, t2])
                else:
                    cache, attn, pos, nxt = c2, m, p2, t2
                alive += [take[r] for r in keep]
        if not alive:
            continue
        attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=-1)
        pos = pos + 1
        out = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos, cache=cache, use_cache=True,
                    logits_to_keep=1)
        nxt = pick(out.logits[:, -1, :], alive)
        for j, t in zip(alive, nxt.tolist()):
            new[j].append(t)
        keep = [r for r, j in enumerate(alive) if not finished(j, new[j][-1])]
        if len(keep) < len(alive):
            if on_done:
                on_done(len(alive) - len(keep))
            if not keep:
                alive, cache = [], None
                continue
            k = torch.tensor(keep, device=device)
            cache.batch_select_indices(k)
            attn, pos, nxt = attn[k], pos[k], nxt[k]
            alive = [alive[r] for r in keep]
            first = int(attn.argmax(dim=-1).min())      # columns every remaining row masks out
            if first > 0:
                for a in layers(cache):
                    a.keys, a.values = a.keys[:, :, first:], a.values[:, :, first:]
                attn = attn[:, first:]
    return new


def generate(model, tokenizer, conversations: Sequence, prefills: Sequence[str] | None = None, *,
             max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             num_samples: int = 1, seed: int = 0, batch_size: int = 8, progress: bool = True,
             engine: str | None = None, on_batch: Callable[[list[int], list[list[str]]], None] | None = None,
             share_prefix: bool = True) -> list[list[str]]:
    """Answer each conversation ``num_samples`` times; returns ``texts[conversation][sample]``.

    ``conversations``: message lists (``[{"role", "content"}, ...]``) or plain strings (one user turn).
    ``prefills``: text forced as the start of each answer (not included in the returned text).
    ``engine``: ``"loop"``, ``"cb"`` or ``"hf"`` (``model.generate``), see the module docstring; None = the
    ``REPBEND_GENERATION_ENGINE`` environment variable, else :data:`DEFAULT_ENGINE`.
    ``on_batch(indices, texts)``: called as soon as conversations are answered (all their samples), with their
    indices and ``texts[k][sample]``, so a caller can store them before the whole call ends.
    ``share_prefix``: the loop engine runs the prompt tokens every row of a batch starts with once
    (:func:`shared_prefix`); False runs every row's whole prompt.
    """
    from tqdm.auto import tqdm
    from transformers import LogitsProcessorList

    if prefills is not None and len(prefills) != len(conversations):
        raise RepbendError(f"got {len(prefills)} prefills for {len(conversations)} conversations; pass one per conversation.")
    if max_new_tokens < 1 or num_samples < 1 or batch_size < 1:
        raise RepbendError("max_new_tokens, num_samples and batch_size must all be >= 1.")
    if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
        raise RepbendError("sampling needs temperature > 0 and 0 < top_p <= 1.")
    if engine is None:
        engine = os.environ.get(ENGINE_ENV) or DEFAULT_ENGINE
    if engine not in ENGINES:
        raise RepbendError(f"Unknown generation engine {engine!r} (argument or {ENGINE_ENV}); choose one of "
                           f"{', '.join(ENGINES)}.")
    if not conversations:
        return []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ctx = context_limit(model)
    limit = max(1, ctx - max_new_tokens) if ctx else None
    prompts, cut = [], 0
    for i, c in enumerate(conversations):
        msgs, pre = _as_messages(c), prefills[i] if prefills else ""
        if limit is None:
            prompts.append(prompt_ids(tokenizer, msgs, pre))
            continue
        ids, was_cut = fit_prompt(tokenizer, msgs, pre, limit)
        prompts.append(ids)
        cut += was_cut
    if cut:
        warnings.warn(f"{cut} of {len(conversations)} requests are longer than the model's context of {ctx} tokens "
                      f"minus {max_new_tokens} new tokens; their longest message was cut from the start to fit.",
                      stacklevel=2)
    # Greedy answers do not depend on the sample index: generate each prompt once.
    jobs = [(i, s) for i in range(len(prompts)) for s in range(num_samples if do_sample else 1)]
    jobs.sort(key=lambda j: -len(prompts[j[0]]))
    results: dict[tuple[int, int], str] = {}
    device = _model_device(model)
    eos = set(_eos_ids(model, tokenizer))
    cfg = copy.deepcopy(model.generation_config)
    cfg.update(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, temperature=None, top_p=None,
               top_k=None, pad_token_id=pad_id, eos_token_id=sorted(eos), max_length=None, use_cache=True)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(jobs), desc="generate", unit="seq", disable=not progress)
    left = [num_samples if do_sample else 1] * len(prompts)     # jobs still to run per conversation

    def texts_of(i: int) -> list[str]:
        return [results[(i, s if do_sample else 0)] for s in range(num_samples)]

    def report(done) -> None:
        ready = []
        for i, _ in done:
            left[i] -= 1
            if not left[i]:
                ready.append(i)
        if on_batch is not None and ready:
            on_batch(ready, [texts_of(i) for i in ready])

    try:
        rows_cb = None
        if engine == "cb":
            gens = ([torch.Generator().manual_seed(_row_seed(seed, prompts[i], s)) for i, s in jobs]
                    if do_sample else None)
            with torch.inference_mode():
                rows_cb = _cb_generate(model, [prompts[i] for i, _ in jobs], pad_id, batch_size, max_new_tokens, eos,
                                       device, gens, (temperature, top_p), bar.update)
        if rows_cb is not None:
            for job, new in zip(jobs, rows_cb):
                cut = next((k for k, t in enumerate(new) if t in eos), len(new))
                results[job] = tokenizer.decode(new[:cut], skip_special_tokens=True)
            report(jobs)
            jobs_left: list = []
        else:
            jobs_left = jobs
        share = share_prefix and engine == "loop" and _plain_cache(model)
        for start, end in length_batches([len(prompts[i]) for i, _ in jobs_left], batch_size, max_new_tokens):
            chunk = jobs_left[start:end]
            rows = [prompts[i] for i, _ in chunk]
            prefix = rows[0][:shared_prefix(rows)] if share else []
            ids, attn = left_pad([q[len(prefix):] for q in rows], pad_id)
            sampler = None
            if do_sample:
                gens = [torch.Generator().manual_seed(_row_seed(seed, prompts[i], s)) for i, s in chunk]
                sampler = _RowSampler(gens, temperature, top_p)
            with torch.inference_mode():
                if engine == "loop":
                    rows = _loop_generate(model, ids.to(device), attn.to(device), max_new_tokens, eos, sampler, prefix)
                else:
                    out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                                         generation_config=cfg,
                                         logits_processor=LogitsProcessorList([sampler] if sampler else []))
                    rows = [out[r, ids.shape[1]:].tolist() for r in range(len(chunk))]
            for r, job in enumerate(chunk):
                new = rows[r]
                cut = next((k for k, t in enumerate(new) if t in eos), len(new))
                results[job] = tokenizer.decode(new[:cut], skip_special_tokens=True)
            report(chunk)
            bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    return [texts_of(i) for i in range(len(prompts))]
