"""Pieces shared by the white-box attacks (embedding, GCG, refusal-direction ablation, re-learning).

* budget and input checks that raise one-line :class:`RepbendError` messages naming the attack;
* :class:`Cost`: wall time and forward/backward passes, reported in ``Completion.meta["cost"]``;
* :func:`prompt_slots`: the chat prompt split around the adversarial slot (after the request, inside
  the user turn, before the end-of-turn / generation prompt), found with the tokenizer's own template;
* :func:`frozen`: model parameters without gradients for the duration of an optimisation (PEFT adapters
  included), restored afterwards;
* :func:`swapped_model`: let ``target.generate`` answer with a modified copy of the model;
* training-side request sources (AdvBench, harmless prompts), kept disjoint from evaluation behaviours.
"""
from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from repbend.errors import RepbendError
from repbend.evaluation.types import Behaviour, Completion, GenSettings

_MARKER = "\u2063ADV_SLOT\u2063"     # invisible separator characters: never part of a real request


@dataclass
class Cost:
    """Cost of one attack on one behaviour (or on a batch, shared)."""

    started: float = field(default_factory=time.perf_counter)
    forward: int = 0        # forward passes (one per sequence in a batch)
    backward: int = 0       # backward passes (one per sequence in a batch)

    def as_dict(self, share: int = 1) -> dict:
        """Cost per behaviour when ``share`` behaviours were attacked together."""
        return {"seconds": round((time.perf_counter() - self.started) / share, 3),
                "forward_passes": self.forward // share if share > 1 else self.forward,
                "backward_passes": self.backward // share if share > 1 else self.backward}


def resolve_preset(presets: dict[str, dict[str, Any]], config: Any) -> dict[str, Any]:
    """The config's preset values with every explicitly set (non-None) field applied on top."""
    out = dict(presets[config.preset])
    out.update({k: v for k, v in config.model_dump().items() if v is not None and k != "preset"})
    return out


def require_targets(attack: str, behaviours: list[Behaviour]) -> None:
    """Target-based attacks need ``Behaviour.target`` (the benchmark's "Sure, here is ..." string)."""
    missing = [b.id for b in behaviours if not (b.target or "").strip()]
    if missing:
        raise RepbendError(
            f"Attack {attack!r} optimises towards an affirmative target but {len(missing)} behaviour(s) have none "
            f"(e.g. {missing[0]!r}); use a benchmark with targets (jbb, advbench) or enable the suite's generic "
            f"target fallback.")


def input_embeddings(attack: str, model: Any) -> torch.nn.Module:
    """The model's input-embedding layer; a clear error when the model does not expose one."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    if emb is None or not hasattr(emb, "weight"):
        raise RepbendError(f"Attack {attack!r} needs access to the model's input embeddings "
                           f"(get_input_embeddings()); this model does not provide them.")
    return emb


def cache_from(layers: list[tuple[torch.Tensor, torch.Tensor]], config: Any) -> Any:
    """A fresh ``DynamicCache`` over per-layer (keys, values): later updates concatenate, so the tensors given
    (a prefix run once and reused every step) are never modified."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=layers, config=config)


def last_positions(n: int, length: int, device: Any = None) -> torch.Tensor:
    """``logits_to_keep`` for the last ``n`` of ``length`` positions as an index tensor, not the int ``n``.

    transformers slices ``hidden[:, -n:]`` for an int: for more than one row that view is not contiguous, and the
    LM head then runs as a batched product against a broadcast weight (on the default model's 49k vocabulary about
    60 GFLOP/s on a 2-core CPU, a fifth of a plain product). Indexing copies the rows into one contiguous block; the
    logits agree to float rounding (4e-5 on logits of magnitude ~10 for 24 rows of GCG candidates)."""
    return torch.arange(length - n, length, device=device)


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


@dataclass
class PromptSlots:
    """Token ids around the adversarial slot: ``before + [adversarial] + after`` is the chat prompt."""

    before: list[int]
    after: list[int]
    target: list[int]
    before_text: str
    after_text: str


def prompt_slots(tokenizer: Any, request: str, target: str = "") -> PromptSlots:
    """Split the rendered prompt of ``request`` at the adversarial slot right after the request text."""
    from repbend.data.chat import render_prompt

    text = render_prompt(tokenizer, [{"role": "user", "content": request + _MARKER}])
    if text.count(_MARKER) != 1:
        raise RepbendError("The chat template alters the user message, so the adversarial slot cannot be placed; "
                           "use a template that keeps the user text verbatim.")
    before, after = text.split(_MARKER)
    ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    return PromptSlots(ids(before), ids(after), ids(target), before, after)


@contextlib.contextmanager
def frozen(model: Any) -> Iterator[None]:
    """No parameter of ``model`` (base or adapter) takes gradients inside the block; eval mode."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


@contextlib.contextmanager
def swapped_model(target: Any, model: Any, tag: str) -> Iterator[Any]:
    """Make ``target.generate`` use ``model`` (e.g. an ablated copy); its cache fingerprint gets ``tag``."""
    old_model, old_fp = target.model, getattr(target, "fingerprint", None)
    target.model = model
    if old_fp is not None:
        target.fingerprint = f"{old_fp}+{tag}"
    try:
        yield target
    finally:
        target.model = old_model
        if old_fp is not None:
            target.fingerprint = old_fp


def suite_settings(target: Any) -> GenSettings:
    return getattr(target, "settings", None) or GenSettings()


def plain_model(model: Any) -> Any:
    """A deep copy of ``model`` with any PEFT adapter merged in (the caller's model is left untouched)."""
    import copy

    dup = copy.deepcopy(model)
    if hasattr(dup, "merge_and_unload") and hasattr(dup, "peft_config"):
        dup = dup.merge_and_unload()
    return dup


def completion(b: Behaviour, attack: str, variant: str, messages: list[dict], text: str, sample: int,
               meta: dict, prefill: str = "") -> Completion:
    return Completion(behaviour_id=b.id, attack=attack, variant=variant, messages=messages, prefill=prefill,
                      text=text, sample=sample, meta=meta)


# ---- training-side request sources (never evaluation behaviours) -------------------------------------


def normalise_text(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def advbench_pairs(exclude: list[Behaviour]) -> list[tuple[str, str]]:
    """AdvBench (goal, target) pairs minus any whose goal matches an evaluation behaviour (normalised text)."""
    from repbend.data.sources import load_advbench

    banned = {normalise_text(b.prompt) for b in exclude} | {normalise_text(b.full_prompt) for b in exclude}
    return [(r["prompt"], r["target"]) for r in load_advbench() if normalise_text(r["prompt"]) not in banned]


def harmless_prompts() -> list[str]:
    """Benign requests written by the project (``repbend/data/resources/benign.jsonl``)."""
    from repbend.data.sources import load_project

    return [r["prompt"] for r in load_project("benign")]


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence ids from the tokenizer and the model's generation config."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    cfg = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(cfg if isinstance(cfg, (list, tuple)) else [cfg] if cfg is not None else [])
    return sorted(ids)
