"""The order in which training draws a split's rows, shared by the trainer and the data build.

Each epoch sorts the split's rows by a hash of ``(seed, split, epoch, row id)``: a row's place does not depend on
which other rows the pool holds. The trainer's sampler (:mod:`repbend.training.data`) draws in this order; a
budgeted data build (:func:`repbend.data.build.answer_budgeted`) walks it to answer only the requests whose rows
a run will draw.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np


def draw_order(keys: Sequence[str], seed: int, split: str, epoch: int) -> np.ndarray:
    """Indices of ``keys`` (row ids, unique) in the order a split's epoch draws them: sorted by a hash of
    ``(seed, split, epoch, key)``, so the order of any subset is the whole pool's order restricted to it."""
    rank = [hashlib.blake2b(f"{seed}|{split}|{epoch}|{k}".encode(), digest_size=8).digest() for k in keys]
    return np.array(sorted(range(len(keys)), key=lambda i: (rank[i], keys[i])), dtype=np.int64)


def copies(split: str, kind: str, repeats: dict[str, int]) -> int:
    """How many times ``data.repeat_kinds`` puts a row of this split and kind in the pool."""
    return repeats.get(f"{split}/{kind}", repeats.get(kind, 1))


def copy_id(row_id: str, copy: int) -> str:
    """The id of a repeated row's ``copy``-th copy (copy 0 keeps the row's id)."""
    return row_id if copy == 0 else f"{row_id}~{copy}"
