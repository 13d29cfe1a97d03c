"""Which prompts the analysis reads, and the per-layer states it keeps of them.

Prompts (held out from training unless said otherwise), each with a ``kind`` and a ``part``:

* ``harmful``: HarmBench behaviours as the direct-request attack sends them (context prepended for contextual
  ones). ``fit`` part: the validation split; ``test`` part: the test split (the quick suite's set).
* ``overrefusal``: the project's XSTest-style safe prompts that look harmful. ``fit``: the ``val`` split;
  ``test``: the ``eval`` split (the one over-refusal is reported on). Both are excluded from training data.
* ``benign``: the project's ordinary benign prompts, split in two seeded halves (``fit`` / ``test``). There is
  no held-out benign set offline: the default data build answers every one of them and trains on them as
  safe/retain rows, so for a trained model these are *seen* prompts (what bending should leave alone).

``fit`` prompts train the linear read-outs; every reported number is on ``test`` prompts. With a built data
folder (``probe_data``) the read-outs are fitted on its training requests instead (unsafe rows = harmful,
benign and over-refusal rows = safe), as the project's earlier separability study did.

By default each prompt's final ``?``/``.``/``!`` is dropped (``strip_final_punct``): no HarmBench behaviour ends
with ``?`` and nearly every over-refusal prompt does, so with it early layers separate the sets by style alone.

States: one position per prompt, the last prompt token (the end of the assistant header: where the model
predicts its answer's first token), at each chosen hidden state (0 = embeddings, i = output of block i,
L = after the final norm; as ``output_hidden_states``). Forward hooks copy that one position out of each
block as the forward runs, so memory holds one batch's activations plus ``prompts x layers x hidden`` floats,
never the full per-token states of every layer.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from repbend.errors import RepbendError
from repbend.models.generation import budget_batches, left_pad

KINDS = ("harmful", "overrefusal", "benign")


@dataclass(frozen=True)
class Prompt:
    id: str
    kind: str      # harmful | overrefusal | benign
    part: str      # fit | test
    text: str


def _subset(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    from repbend.evaluation.benchmarks.packaged import stratified_subset

    return stratified_subset(rows, n, seed)


def heldout_prompts(max_prompts: int | None = 48, seed: int = 0, include_contextual: bool = True) -> list[Prompt]:
    """The fit and test prompts of every kind (at most ``max_prompts`` per kind and part; None = all);
    ``include_contextual=False`` leaves HarmBench's contextual behaviours (200-700-token contexts) out."""
    from repbend.data.sources import load_harmbench, load_project

    def text(r: dict) -> str:
        return f"{r['context']}\n\n---\n\n{r['prompt']}" if r.get("context") else r["prompt"]

    out: list[Prompt] = []
    for part, split in (("fit", "val"), ("test", "test")):
        rows = load_harmbench(split=split, include_contextual=include_contextual)
        out += [Prompt(r["id"], "harmful", part, text(r)) for r in _subset(rows, max_prompts, seed)]
    for part, split in (("fit", "val"), ("test", "eval")):
        out += [Prompt(r["id"], "overrefusal", part, r["prompt"])
                for r in _subset(load_project("overrefusal", split=split), max_prompts, seed)]
    benign = load_project("benign")
    order = list(range(len(benign)))
    random.Random(seed).shuffle(order)
    halves = {"fit": sorted(order[: len(order) // 2]), "test": sorted(order[len(order) // 2:])}
    for part, idx in halves.items():
        out += [Prompt(r["id"], "benign", part, r["prompt"]) for r in _subset([benign[i] for i in idx], max_prompts, seed)]
    return out


def strip_final_punct(text: str) -> str:
    """``text`` without trailing whitespace and final ``?``/``.``/``!`` characters."""
    return text.rstrip().rstrip("?.!").rstrip()


def training_prompts(data_dir: str, max_prompts: int | None = None, seed: int = 0) -> list[Prompt]:
    """``fit`` prompts from a built data folder's training requests (harmful: unsafe rows; safe: the rest)."""
    from pathlib import Path

    from repbend.io import read_jsonl

    path = Path(data_dir).expanduser() / "train.jsonl"
    if not path.is_file():
        raise RepbendError(f"{path} not found; pass --probe-data a `repbend data build` output folder.")
    rows = read_jsonl(path)
    harmful = sorted({r["messages"][-1]["content"] for r in rows if r["split"] == "unsafe"})
    safe = sorted({r["messages"][-1]["content"] for r in rows if r["kind"] in ("benign", "overrefusal")} - set(harmful))
    rng = random.Random(seed)
    pick = lambda xs: xs if max_prompts is None or len(xs) <= max_prompts else sorted(rng.sample(xs, max_prompts))  # noqa: E731
    kind_of = {r["messages"][-1]["content"]: r["kind"] for r in rows if r["kind"] in ("benign", "overrefusal")}
    return ([Prompt(f"train/h{i}", "harmful", "fit", t) for i, t in enumerate(pick(harmful))]
            + [Prompt(f"train/s{i}", kind_of[t], "fit", t) for i, t in enumerate(pick(safe))])


def parse_layers(spec: str | None, num_states: int) -> list[int]:
    """``None``/``all`` = every hidden state 0..L; else ``"3,7,15"`` or ranges ``"0-30"``/``"0-30:3"`` (inclusive)."""
    if spec is None or str(spec).strip().lower() == "all":
        return list(range(num_states))
    out: set[int] = set()
    try:
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            rng, _, step = part.partition(":")
            lo, sep, hi = rng.partition("-")
            a, b = int(lo), int(hi) if sep else int(lo)
            out.update(range(a, b + 1, int(step) if step else 1))
    except ValueError:
        raise RepbendError(f"--layers {spec!r}: use 'all', a list like 3,7,15 or a range like 0-30:2.") from None
    bad = sorted(x for x in out if not 0 <= x < num_states)
    if bad or not out:
        raise RepbendError(f"--layers {spec!r}: hidden states run 0..{num_states - 1} for this model (got {bad or 'none'}).")
    return sorted(out)


def _unwrap(model: Any) -> Any:
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_parts(model: Any) -> tuple[Any, Any, Any, Any]:
    """``(decoder, embed_tokens, blocks, final_norm)`` of a causal LM (through PEFT/DDP wrappers)."""
    from repbend.models.hooks import decoder_layers

    base = _unwrap(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    blocks = decoder_layers(base)
    norm = getattr(decoder, "norm", None)
    if norm is None:
        raise RepbendError("This model's decoder has no final .norm; analysis supports Llama/Mistral/Qwen-style models.")
    return decoder, decoder.get_input_embeddings(), blocks, norm


@contextlib.contextmanager
def _capture_last(model: Any, layers: list[int], store: dict[int, torch.Tensor]) -> Iterator[None]:
    """Hooks that put the last position's state of each chosen hidden state into ``store[layer]`` (float32, CPU)."""
    _, embed, blocks, norm = decoder_parts(model)
    n = len(blocks)
    modules = {0: embed, n: norm, **{i: blocks[i - 1] for i in range(1, n)}}

    def hook_for(layer: int):
        def hook(_m, _inp, out):
            h = out[0] if isinstance(out, tuple) else out
            store[layer] = h[:, -1].detach().float().cpu()
        return hook

    handles = [modules[l].register_forward_hook(hook_for(l)) for l in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def num_hidden_states(model: Any) -> int:
    return len(decoder_parts(model)[2]) + 1


@torch.no_grad()
def collect_states(model: Any, tokenizer: Any, prompts: list[Prompt], layers: list[int], *, batch_size: int = 8,
                   desc: str = "states", progress: bool = True) -> torch.Tensor:
    """``(len(prompts), len(layers), hidden)`` float32 states at each prompt's last token (see module docstring).

    Prompts run left-padded in batches of similar length (at most ``batch_size`` rows and
    :data:`~repbend.models.generation.PREFILL_CHUNK_TOKENS` padded tokens) with explicit position ids, so a row's
    states do not depend on its batch (up to kernel numerics). Only the decoder runs (no LM head over the sequence).
    """
    from tqdm import tqdm

    from repbend.data.chat import prompt_ids

    if not prompts:
        return torch.zeros(0, len(layers), 0)
    decoder = decoder_parts(model)[0]
    device = next(decoder.parameters()).device
    ids = [prompt_ids(tokenizer, [{"role": "user", "content": p.text}]) for p in prompts]
    out: torch.Tensor | None = None
    store: dict[int, torch.Tensor] = {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    with _capture_last(model, layers, store):
        for idx in budget_batches([len(x) for x in ids], batch_size):
            x, mask = left_pad([ids[i] for i in idx], pad)
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            store.clear()
            decoder(input_ids=x.to(device), attention_mask=mask.to(device), position_ids=pos.to(device), use_cache=False)
            got = torch.stack([store[l] for l in layers], dim=1)
            if out is None:
                out = torch.zeros(len(prompts), len(layers), got.shape[-1])
            out[torch.tensor(idx)] = got
            bar.update(len(idx))
    bar.close()
    assert out is not None
    return out
