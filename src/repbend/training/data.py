"""Training data: rows of a built dataset -> encoded pools -> seeded per-step batches of every split.

Each step draws ``batch_size[split]`` rows per process from each split the method needs. An epoch's order sorts
the split's rows by a hash of ``(seed, split, epoch, row id)`` (:func:`repbend.data.order.draw_order`): a row's place depends on its
own id only, so any pool that holds the first N rows of the whole pool's order draws exactly those N rows in the same
order. That is what lets a data build answer only the requests a run will draw (``rows_needed``) and still train
the run of a whole-pool build. Process ``r`` of ``W`` takes the r-th slice
of every global draw, so ranks never see the same row in a step. The sampler's whole state is
``{split: (epoch, position)}``: saved in checkpoints, it makes ``--resume`` draw exactly the batches an
uninterrupted run would. ``pair`` rows are not drawn: for unsafe row i the pair is the refusal row with
the same ``pair_id`` (unsafe rows without one are left out when the method needs ``pair``).

Paired refusals (``data.paired_refusals = k``, off at 0): the refusals of the first ``k`` unsafe rows of each
step (same ``pair_id``: the same harmful request answered with a refusal) join that step's safe rows, after
``batch_size.safe - k`` safe rows drawn as usual — the published batch composition, where a harmful request's
refusal and its harmful answer are bent and kept in the same step. Unsafe rows without a refusal are then left
out of the unsafe pool. With k = 0 the draws are exactly those of a sampler without the option.

Response ending (``data.response_end_of_turn``, on by default): off, the safe/unsafe/pair responses end with
their text, without the chat template's end-of-turn token (as the published data); retain rows keep theirs
(the published retain rows are whole rendered conversations).

Length bucketing (optional) sorts windows of ``bucket_batches`` consecutive batches of the permutation
by length and then shuffles the batch order inside the window, so rows of similar length share a
batch (less padding) while the epoch still covers every row once.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from repbend.data.chat import Encoded, collate, encode
from repbend.data.order import copies, copy_id, draw_order
from repbend.errors import RepbendError
from repbend.methods.base import SeqBatch

_SPLIT_SALT = {"safe": 1, "unsafe": 2, "retain": 3}


def load_rows(data_dir: str | Path, part: str = "train") -> list[dict]:
    """Rows of a built dataset's ``train`` or ``val`` part (schema-checked by ``load_built``)."""
    from repbend.data.dataset import load_built

    ds = load_built(data_dir)
    return list(ds.train if part == "train" else ds.val)


def draws_of(cfg, world: int = 1):
    """The rows a training run (a TrainConfig) draws per split, as a data build's ``rows_needed.draws`` entry: its
    seed, ``steps x grad_accum x batch size x world`` (rounded up to whole windows with length bucketing, whose
    windows are sorted as a whole) and its repeat_kinds."""
    import math

    from repbend.data.build_config import Draws

    steps = cfg.training.max_steps * cfg.training.grad_accum * world
    rows = {}
    for split in ("safe", "unsafe", "retain"):
        bs = int(cfg.data.batch_size.get(split, 0))
        window = bs * cfg.data.bucket_batches if cfg.data.length_bucketing and bs else 1
        rows[split] = math.ceil(steps * bs / window) * window
    return Draws(seed=cfg.training.seed, repeat_kinds=dict(cfg.data.repeat_kinds), **rows)


def budget_note(cfg, world: int = 1) -> str | None:
    """One line when the run's data were built for other draws (``rows_needed``) than this run's: the rows past the
    budget then differ from those a whole-pool build would give, and a long run may cycle a small pool."""
    import json

    budget = json.loads((Path(cfg.data.dir) / "manifest.json").read_text(encoding="utf-8")).get("rows_needed")
    if not budget:
        return None
    if cfg.training.eval_every > 0 and budget.get("val_retain") is not None:
        return (f"repbend: {cfg.data.dir} answered only the held-out requests of its first {budget['val_retain']} "
                f"val retain rows (rows_needed.val_retain), so the validation loss (eval_every) reads a partial val "
                f"split; build the data with rows_needed.val_retain=null for the whole one.")
    mine = draws_of(cfg, world)
    splits = ("safe", "unsafe", "retain")
    for d in budget.get("draws") or []:
        if d.get("seed") == mine.seed and (d.get("repeat_kinds") or {}) == mine.repeat_kinds and all(
                d.get(s, 0) >= getattr(mine, s) for s in splits):
            return None
    return (f"repbend: {cfg.data.dir} was built for other draws (rows_needed in its manifest) than this run's (seed "
            f"{mine.seed}, {', '.join(f'{s} {getattr(mine, s)}' for s in splits)} rows): past the budget it draws other "
            f"rows than a whole-pool build would; build the data for this run (repbend data build without "
            f"rows_needed, or a pipeline with these training settings).")


def repeat_kinds(rows: Sequence[dict], repeats: dict[str, int]) -> list[dict]:
    """Every row whose ``kind`` (or ``split/kind``) is in ``repeats`` repeated that many times, in place (the copies'
    ids get ``~1``, ``~2``, ... so that each copy has its own place in the draw order).

    A ``split/kind`` key (``retain/overrefusal``) beats a plain ``kind`` key for rows of that split. RepbendError
    when a key matches no row, so a typo does not silently train without oversampling.
    """
    if not repeats:
        return list(rows)
    keys = [(r.get("kind"), f"{r.get('split')}/{r.get('kind')}") for r in rows]
    missing = sorted(set(repeats) - {k for pair in keys for k in pair})
    if missing:
        raise RepbendError(f"data.repeat_kinds names kind(s) {missing} that the training data does not have; "
                           f"kinds present: {sorted({kind for kind, _ in keys if kind})} "
                           f"(or split/kind, e.g. retain/overrefusal).")
    return [r if c == 0 else {**r, "id": copy_id(r["id"], c)}
            for r in rows for c in range(copies(r.get("split"), r.get("kind"), repeats))]


def split_rows(rows: Sequence[dict], needed: Sequence[str], paired: bool = False) -> dict[str, list[dict]]:
    """Rows per needed split (``pair`` -> aligned refusals of the unsafe rows); RepbendError when one is empty.

    ``paired`` (data.paired_refusals > 0) adds ``"paired"``: the refusal of each unsafe row (aligned, same
    ``pair_id``), a pool the sampler takes safe rows from, not a split of its own."""
    by = {s: [r for r in rows if r.get("split") == s] for s in ("safe", "unsafe", "retain")}
    linked = "pair" in needed or (paired and "unsafe" in needed and "safe" in needed)
    if linked:
        refusals = {r["pair_id"]: r for r in by["safe"] if r.get("kind") == "refusal" and r.get("pair_id")}
        by["unsafe"] = [r for r in by["unsafe"] if r.get("pair_id") in refusals]
        by["pair"] = [refusals[r["pair_id"]] for r in by["unsafe"]]
    out = {}
    for s in needed:
        if not by.get(s):
            extra = " with a refusal of the same pair_id" if s in ("pair", "unsafe") and linked else ""
            raise RepbendError(f"The training data has no {s!r} rows{extra} but the method needs them; "
                               f"rebuild the data set with {s} rows or change the method's weights.")
        out[s] = by[s]
    if linked and paired and "safe" in needed:
        out["paired"] = by["pair"]
    return out


def encode_rows(tokenizer, rows: Sequence[dict], max_request_tokens: int, max_response_tokens: int,
                desc: str = "encode", end_of_turn: bool = True) -> list[Encoded]:
    return [encode(tokenizer, r["messages"], r.get("response"), max_request_tokens=max_request_tokens,
                   max_response_tokens=max_response_tokens, end_of_turn=end_of_turn)
            for r in tqdm(rows, desc=desc, leave=False, disable=len(rows) < 500)]


def encode_pools(tokenizer, rows: Sequence[dict], needed: Sequence[str],
                 data) -> tuple[dict[str, list[Encoded]], dict[str, list[str]]]:
    """Encoded rows per split the method needs (and ``paired``), with the data section's options (``data`` = a
    training config's DataSection), and the rows' ids per split (the draw order's keys)."""
    by_split = split_rows(rows, needed, paired=data.paired_refusals > 0)
    return ({s: encode_rows(tokenizer, r, data.max_request_tokens, data.max_response_tokens, f"encode {s}",
                            end_of_turn=data.response_end_of_turn or s == "retain") for s, r in by_split.items()},
            {s: [row["id"] for row in r] for s, r in by_split.items()})


@dataclass
class _Cursor:
    epoch: int = 0
    pos: int = 0


class StepSampler:
    """Seeded, resumable, rank-aware sampling of one batch per split per step."""

    def __init__(self, pools: dict[str, list[Encoded]], batch_size: dict[str, int], seed: int, rank: int = 0,
                 world: int = 1, bucketing: bool = False, bucket_batches: int = 16, paired_refusals: int = 0,
                 ids: dict[str, list[str]] | None = None):
        """``ids``: each split's row ids (the draw order's keys); row positions when not given (a pool made by hand)."""
        self.pools = pools
        self.ids = {s: (ids or {}).get(s) or [str(i) for i in range(len(pool))] for s, pool in pools.items()}
        self.drawn = [s for s in pools if s not in ("pair", "paired")]
        self.paired = paired_refusals if "paired" in pools else 0
        self.bs = {s: batch_size.get(s, 4) - (self.paired if s == "safe" else 0) for s in self.drawn}
        self.seed, self.rank, self.world = seed, rank, world
        self.bucketing, self.bucket_batches = bucketing, bucket_batches
        self.cursor = {s: _Cursor() for s in self.drawn}
        self._perm_cache: dict[str, tuple[int, np.ndarray]] = {}

    def _perm(self, split: str, epoch: int) -> np.ndarray:
        cached = self._perm_cache.get(split)
        if cached is None or cached[0] != epoch:  # keep only the current epoch's permutation per split
            perm = draw_order(self.ids[split], self.seed, split, epoch)
            if self.bucketing:
                rng = np.random.default_rng([self.seed, _SPLIT_SALT.get(split, 9), epoch])
                perm = self._bucket(split, perm, rng)
            self._perm_cache[split] = cached = (epoch, perm)
        return cached[1]

    def _bucket(self, split: str, perm: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        step = self.bs[split] * self.world
        lengths = np.array([len(self.pools[split][i].input_ids) for i in perm])
        out = []
        for w in range(0, len(perm), step * self.bucket_batches):
            win = perm[w:w + step * self.bucket_batches][np.argsort(lengths[w:w + step * self.bucket_batches],
                                                                     kind="stable")]
            chunks = [win[i:i + step] for i in range(0, len(win), step)]
            out += [chunks[i] for i in rng.permutation(len(chunks))]
        return np.concatenate(out)

    def _draw(self, split: str) -> list[int]:
        need, c = self.bs[split] * self.world, self.cursor[split]
        idx: list[int] = []
        if need == 0:  # every safe row of the step is a paired refusal
            return idx
        while len(idx) < need:
            perm = self._perm(split, c.epoch)
            take = perm[c.pos:c.pos + need - len(idx)]
            idx += take.tolist()
            c.pos += len(take)
            if c.pos >= len(perm):
                c.epoch, c.pos = c.epoch + 1, 0
        b = self.bs[split]
        return idx[self.rank * b:(self.rank + 1) * b]

    def next(self) -> dict[str, list[Encoded]]:
        """This process's rows for the next step: ``{split: [Encoded, ...]}`` (pair aligned with unsafe)."""
        out, unsafe_idx = {}, []
        for s in self.drawn:
            idx = self._draw(s)
            out[s] = [self.pools[s][i] for i in idx]
            if s == "unsafe":
                unsafe_idx = idx
                if "pair" in self.pools:
                    out["pair"] = [self.pools["pair"][i] for i in idx]
        if self.paired:
            out["safe"] = out["safe"] + [self.pools["paired"][i] for i in unsafe_idx[:self.paired]]
        return out

    def state_dict(self) -> dict:
        return {s: [c.epoch, c.pos] for s, c in self.cursor.items()}

    def load_state_dict(self, state: dict) -> None:
        for s, (epoch, pos) in state.items():
            if s in self.cursor:
                self.cursor[s] = _Cursor(int(epoch), int(pos))


def collate_splits(items: dict[str, list[Encoded]], pad_id: int) -> tuple[SeqBatch, dict[str, slice]]:
    """All splits in ONE right-padded batch (longest row sets the width) and each split's row range."""
    order = [s for s in ("safe", "unsafe", "retain", "pair") if s in items] + \
            [s for s in items if s not in ("safe", "unsafe", "retain", "pair")]
    flat, spans, start = [], {}, 0
    for s in order:
        flat += items[s]
        spans[s] = slice(start, start + len(items[s]))
        start += len(items[s])
    return collate(flat, pad_id, "right"), spans


def width_groups(items: dict[str, list[Encoded]], overhead: int = 32) -> list[list[str]]:
    """The splits of ``items`` cut into groups that each run as one padded pass: splits sorted by their longest
    row, consecutive groups chosen exactly (dynamic programme) to minimise the padded tokens (rows x the group's
    longest row) plus ``overhead`` token-equivalents per pass. Safe, unsafe and retain rows differ in
    length (a refusal is short, a retain conversation long), and one padded batch of all of them spent about a
    fifth of a step's tokens on padding."""
    from repbend.models.generation import cheapest_cuts

    order = sorted(items, key=lambda s: max(len(e.input_ids) for e in items[s]))
    width = [max(len(e.input_ids) for e in items[s]) for s in order]
    return [order[i:j] for i, j in cheapest_cuts(width, [len(items[s]) for s in order], overhead)]


def collate_groups(items: dict[str, list[Encoded]], pad_id: int, groups: Sequence[Sequence[str]] | None = None
                   ) -> list[tuple[SeqBatch, dict[str, slice]]]:
    """One right-padded batch per group of splits (``None``: every split in one batch, :func:`collate_splits`),
    each with its splits' row ranges."""
    if groups is None:
        return [collate_splits(items, pad_id)]
    return [collate_splits({s: items[s] for s in g}, pad_id) for g in groups]


def rows_of(batch: SeqBatch, sl: slice) -> SeqBatch:
    return SeqBatch(batch.input_ids[sl], batch.attention_mask[sl], batch.request_mask[sl], batch.response_mask[sl],
                    batch.last_request_index[sl])


def select_rows(batch: SeqBatch, spans: dict[str, slice], splits: Sequence[str]) -> tuple[SeqBatch, dict[str, slice]]:
    """The rows of ``splits`` only (same width), with their new row ranges."""
    idx, new, start = [], {}, 0
    for s in splits:
        sl = spans[s]
        idx.append(torch.arange(sl.start, sl.stop))
        new[s] = slice(start, start + sl.stop - sl.start)
        start += sl.stop - sl.start
    i = torch.cat(idx).to(batch.input_ids.device)
    return SeqBatch(*(t.index_select(0, i) for t in (batch.input_ids, batch.attention_mask, batch.request_mask,
                                                       batch.response_mask, batch.last_request_index))), new
