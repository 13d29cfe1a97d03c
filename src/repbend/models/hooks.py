"""Adding vectors to decoder-block outputs (every row or some rows of a batch): the white-box `steering` attack's
mechanism."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor

from repbend.errors import RepbendError


def decoder_layers(model: Any) -> Any:
    """The decoder blocks (``.layers``) of a causal LM, through PEFT and DDP/DeepSpeed (``.module``) wrappers."""
    model = getattr(model, "module", model)
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise RepbendError("This operation supports decoder models with a .layers list (Llama, Mistral, Qwen); this "
                           "model has none.")
    return layers


@contextlib.contextmanager
def shift_block_outputs(model: Any, shifts: list[tuple[slice | list[int], dict[int, Tensor]]]) -> Iterator[None]:
    """For each ``(rows, {l: vector})`` add the vector to the output of decoder block ``l`` (hidden state ``l``,
    1..L-1) for those rows (a slice, ``slice(None)`` = every row, or a list of row indices), at every position,
    while the block is open (forward hooks, always removed). The hidden state the model reports for ``l`` itself
    may be taken before the hook (transformers records it with its own hooks); every later state sees the shift."""
    if not shifts:
        yield
        return
    blocks = decoder_layers(model)
    per_layer: dict[int, list[tuple[slice, Tensor]]] = {}
    for rows, by_layer in shifts:
        for l, vec in by_layer.items():
            if not 1 <= l <= len(blocks) - 1:
                raise RepbendError(f"A shift at hidden state {l} is out of range 1..{len(blocks) - 1} (block outputs).")
            per_layer.setdefault(l, []).append((rows, vec))

    def make_hook(items):
        def hook(_m, _inp, out):
            h = out[0] if isinstance(out, tuple) else out
            add = torch.zeros(h.shape[0], 1, h.shape[-1], dtype=h.dtype, device=h.device)
            for rows, vec in items:
                add[rows] = vec.to(device=h.device, dtype=h.dtype)
            h = h + add
            return (h, *out[1:]) if isinstance(out, tuple) else h
        return hook

    handles = [blocks[l - 1].register_forward_hook(make_hook(items)) for l, items in per_layer.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
