"""Batched generation: chat template, optional prefill, left padding, KV cache (``model.generate``).

Prompts are sorted by length (longest first, so a batch that does not fit in memory fails at once) and
the answers are returned in input order. Works for plain transformers models and PEFT models.

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
import hashlib
from typing import Sequence

import torch

from repbend.models.chat import prompt_ids
from repbend.errors import RepbendError


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


def generate(model, tokenizer, conversations: Sequence, prefills: Sequence[str] | None = None, *,
             max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             num_samples: int = 1, seed: int = 0, batch_size: int = 8, progress: bool = True) -> list[list[str]]:
    """Answer each conversation ``num_samples`` times; returns ``texts[conversation][sample]``.

    ``conversations``: message lists (``[{"role", "content"}, ...]``) or plain strings (one user turn).
    ``prefills``: text forced as the start of each answer (not included in the returned text).
    """
    from tqdm.auto import tqdm
    from transformers import LogitsProcessorList

    if prefills is not None and len(prefills) != len(conversations):
        raise RepbendError(f"got {len(prefills)} prefills for {len(conversations)} conversations; pass one per conversation.")
    if max_new_tokens < 1 or num_samples < 1 or batch_size < 1:
        raise RepbendError("max_new_tokens, num_samples and batch_size must all be >= 1.")
    if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
        raise RepbendError("sampling needs temperature > 0 and 0 < top_p <= 1.")
    if not conversations:
        return []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [prompt_ids(tokenizer, _as_messages(c), prefills[i] if prefills else "")
               for i, c in enumerate(conversations)]
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
    try:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            width = max(len(prompts[i]) for i, _ in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attn = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (i, _) in enumerate(chunk):
                ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
                attn[r, width - len(prompts[i]):] = 1
            processors = LogitsProcessorList()
            if do_sample:
                gens = [torch.Generator().manual_seed(_row_seed(seed, prompts[i], s)) for i, s in chunk]
                processors.append(_RowSampler(gens, temperature, top_p))
            with torch.inference_mode():
                out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), generation_config=cfg,
                                     logits_processor=processors)
            for r, job in enumerate(chunk):
                new = out[r, width:].tolist()
                cut = next((k for k, t in enumerate(new) if t in eos), len(new))
                results[job] = tokenizer.decode(new[:cut], skip_special_tokens=True)
            bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    return [[results[(i, s if do_sample else 0)] for s in range(num_samples)] for i in range(len(prompts))]
