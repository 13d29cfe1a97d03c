"""The model under evaluation, with an on-disk cache in front of generation.

:class:`ModelTarget` implements :class:`repbend.evaluation.types.Target`. Attacks hand it
:class:`Conversation` lists; it answers from the :class:`~repbend.evaluation.store.Store` what was
generated before and generates only the rest (batched, left padding, KV cache via
``repbend.models.generation.generate``), writing each batch to the store as soon as it is done. So an
interrupted evaluation resumes without regenerating, and an identical request (same model, attack,
variant, messages, prefill, settings, sample) is never generated twice — not even twice in one call.

White-box attacks get the model itself from ``target.model`` / ``target.tokenizer`` and the suite's
generation settings from ``target.settings``. An attack that changes the model temporarily (hooks,
ablated weights) may still call ``target.generate`` inside its context manager: its conversations
carry its own attack name, so their cache keys never collide with the unmodified model's.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from typing import Any, Callable

from repbend.evaluation.store import Store, completion_key
from repbend.evaluation.types import Conversation, GenSettings


def fingerprint_model(model: Any, *extra: str) -> str:
    """A short hash identifying the weights (cheap: shapes + a few values of every tensor) + ``extra``.

    Two different checkpoints (or the same base with a different adapter) get different fingerprints,
    so cached completions of one are never served for the other.
    """
    import torch

    h = hashlib.sha256()
    for part in extra:
        h.update(str(part).encode())
    h.update(type(model).__name__.encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            k = min(16, flat.numel())
            idx = torch.arange(k, dtype=torch.long) * (flat.numel() - 1) // max(1, k - 1)  # exact integer spacing
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(flat[idx].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class ModelTarget:
    """``generate(conversations, settings) -> list[list[str]]`` with a Store-backed cache.

    Args:
        model, tokenizer: a loaded causal LM (PeftModel fine) and its tokenizer (chat template).
        store: where completions are cached (``Store(output_dir / "cache.jsonl")``).
        batch_size: conversations per generation call; each batch is stored as soon as it is done.
        fingerprint: identifies the weights (see :func:`fingerprint_model`); part of every cache key.
        settings: the suite's default generation settings (``conversation.settings`` overrides them).
        progress: show a progress bar per generate call.
        generate_fn: the batched generator; defaults to ``repbend.models.generation.generate``.
        group: batches handed to the generator per call (each batch's answers are stored as soon as the
            generator reports them): the generator's length batching and continuous batching see the whole group.

    ``stats`` counts what happened: ``generated`` / ``cached`` samples, ``new_tokens`` and
    ``seconds`` spent generating (for tokens/s), ``calls`` to the generator.
    """

    def __init__(self, model: Any, tokenizer: Any, store: Store, *, batch_size: int = 8, fingerprint: str,
                 settings: GenSettings | None = None, progress: bool = True,
                 generate_fn: Callable[..., list[list[str]]] | None = None, group: int = 1):
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.batch_size = batch_size
        self.fingerprint = fingerprint
        self.settings = settings or GenSettings()
        self.progress = progress
        self._generate_fn = generate_fn
        self.group = max(1, group)
        self.stats = {"generated": 0, "cached": 0, "new_tokens": 0, "seconds": 0.0, "calls": 0}
        self._seen: set[str] = set()

    def key(self, conv: Conversation, settings: GenSettings, sample: int) -> str:
        return completion_key(fingerprint=self.fingerprint, attack=conv.attack, variant=conv.variant,
                              messages=conv.messages, prefill=conv.prefill, settings=settings, sample=sample)

    def generate(self, conversations: list[Conversation], settings: GenSettings | None = None, *,
                 group: int | None = None) -> list[list[str]]:
        """Answers (``num_samples`` strings each, without the prefill) for every conversation, in order.

        ``group``: batches per generator call for this call (default: the target's ``group``); answers are stored
        as each batch ends either way."""
        base = settings or self.settings
        eff = [c.settings or base for c in conversations]
        keys = [[self.key(c, s, k) for k in range(s.num_samples)] for c, s in zip(conversations, eff)]

        todo: dict[str, list[int]] = {}      # settings key -> first index of each distinct missing request
        seen: set[str] = set()
        for i, ks in enumerate(keys):
            if all(self._cached(k) for k in ks):
                # each answer counts once per run: generated, or served from the cache (pooled answers are
                # looked up again by their attack)
                self.stats["cached"] += sum(k not in self._seen for k in ks)
                self._seen.update(ks)
            elif ks[0] not in seen:
                seen.add(ks[0])
                todo.setdefault(eff[i].key(), []).append(i)
        total = sum(eff[i].num_samples for idxs in todo.values() for i in idxs)
        if total:
            from tqdm.auto import tqdm

            names = sorted({c.attack for c in conversations})
            label = names[0] if len(names) == 1 else f"{len(names)} attacks"
            with tqdm(total=total, desc=f"generate {label}", unit="ans", disable=not self.progress,
                      leave=False) as bar:
                for idxs in todo.values():
                    idxs.sort(key=lambda i: -_length(conversations[i]))  # similar lengths share a batch: less padding
                    step = (group or self.group) * max(1, self.batch_size // eff[idxs[0]].num_samples)
                    for start in range(0, len(idxs), step):
                        part = idxs[start:start + step]
                        self._run_batch([conversations[i] for i in part], eff[part[0]], [keys[i] for i in part])
                        bar.update(sum(eff[i].num_samples for i in part))
        return [[self.store.get(k)["text"] for k in ks] for ks in keys]

    def _cached(self, key: str) -> bool:
        """Whether the store holds a usable answer under ``key`` (a record without its text is generated again)."""
        rec = self.store.get(key)
        return rec is not None and isinstance(rec.get("text"), str)

    def _run_batch(self, convs: list[Conversation], s: GenSettings, keys: list[list[str]]) -> None:
        """One generator call; its answers are stored batch by batch as the generator reports them (``on_batch``),
        the rest (a generator that does not report) when the call returns."""
        gen = self._generate_fn
        if gen is None:
            from repbend.models.generation import generate as gen
        t0 = time.perf_counter()
        clock, stored = [t0], set()

        def store(idx: list[int], outs: list[list[str]]) -> None:
            now = time.perf_counter()
            seconds, clock[0] = now - clock[0], now
            rows = []
            for i, texts in zip(idx, outs):
                if len(texts) != s.num_samples:
                    raise RuntimeError(f"generator returned {len(texts)} samples, expected {s.num_samples}")
                for k, (key, text) in enumerate(zip(keys[i], texts)):
                    n_tok = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
                    self.stats["new_tokens"] += n_tok
                    self.stats["generated"] += 1
                    rows.append((key, {"kind": "completion", "fingerprint": self.fingerprint,
                                       "behaviour_id": convs[i].behaviour_id, "attack": convs[i].attack,
                                       "variant": convs[i].variant, "sample": k, "settings": s.key(),
                                       "text": text, "new_tokens": n_tok,
                                       "seconds": round(seconds / max(1, len(idx) * s.num_samples), 4)}))
            self.store.put_many(rows)
            self._seen.update(key for key, _ in rows)
            stored.update(idx)

        outs = gen(self.model, self.tokenizer, [c.messages for c in convs], [c.prefill for c in convs],
                   max_new_tokens=s.max_new_tokens, do_sample=s.do_sample, temperature=s.temperature,
                   top_p=s.top_p, num_samples=s.num_samples, seed=s.seed, batch_size=self.batch_size,
                   progress=False, on_batch=store)
        rest = [i for i in range(len(convs)) if i not in stored]
        if rest:
            store(rest, [outs[i] for i in rest])
        self.stats["calls"] += 1
        self.stats["seconds"] += time.perf_counter() - t0

    def throughput(self) -> dict:
        """Generation throughput so far: new tokens per second of generation wall time."""
        secs = self.stats["seconds"]
        return {"tokens_per_s": round(self.stats["new_tokens"] / secs, 2) if secs else None,
                "batch_size": self.batch_size, **{k: (round(v, 2) if isinstance(v, float) else v)
                                                   for k, v in self.stats.items()}}


def _length(conv: Conversation) -> int:
    return sum(len(m.get("content") or "") for m in conv.messages) + len(conv.prefill)


def with_settings(conv: Conversation, settings: GenSettings) -> Conversation:
    """A copy of ``conv`` forced to ``settings`` (used by best-of-N)."""
    return replace(conv, settings=settings)
