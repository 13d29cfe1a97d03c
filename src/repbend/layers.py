"""The one range check for layer indices in configs (methods, LoRA blocks, white-box attacks).

Two numberings exist (docs/DESIGN.md, "Hidden-state indexing"): *hidden-state* indices 0..L of
``output_hidden_states`` (0 = embeddings, i = output of block i, L = last block after the final norm), and
*block* indices 0..L-1 of the decoder blocks (LoRA ``layers_to_transform``). ``check_layers`` raises one
:class:`~repbend.errors.ConfigError` naming the field, the bad indices and the allowed range.
"""
from __future__ import annotations

from typing import Iterable, Literal

from repbend.errors import ConfigError

Kind = Literal["hidden_state", "block_output", "block"]

_RANGES = {  # kind -> (lowest, highest as an offset from num_layers, what the indices are)
    "hidden_state": (0, 0, "hidden-state indices"),
    "block_output": (1, -1, "hidden-state indices of block outputs"),
    "block": (0, -1, "block indices"),
}


def layer_range(num_layers: int, kind: Kind = "hidden_state") -> tuple[int, int]:
    """The allowed (lowest, highest) index of ``kind`` for a model with ``num_layers`` decoder blocks."""
    lo, off, _ = _RANGES[kind]
    return lo, num_layers + off


def check_layers(layers: Iterable[int], num_layers: int, field: str, kind: Kind = "hidden_state") -> list[int]:
    """``layers`` sorted (duplicates kept); ConfigError naming ``field`` when any index is outside the range of
    ``kind``: ``hidden_state`` 0..L, ``block_output`` 1..L-1 (a block's output, not the embeddings or the final
    norm), ``block`` 0..L-1 (decoder blocks, e.g. LoRA ``layers_to_transform``)."""
    layers = list(layers)
    lo, hi = layer_range(num_layers, kind)
    bad = [i for i in layers if not lo <= i <= hi]
    if bad:
        raise ConfigError(f"{field}: {_RANGES[kind][2]} {bad} are out of range {lo}..{hi} (the model has {num_layers} "
                          f"blocks; hidden state 0 = embeddings, {num_layers} = last block after the final norm).")
    return sorted(layers)
