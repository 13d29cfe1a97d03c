"""Step sampler (seeded, rank-disjoint, resumable, bucketing) and split/pair selection."""
from __future__ import annotations

import pytest

from repbend.data.chat import Encoded
from repbend.errors import RepbendError
from repbend.training.data import StepSampler, collate_groups, collate_splits, repeat_kinds, split_rows, width_groups
from train_fixtures import make_rows


def _pool(n, offset=0):
    return [Encoded(list(range(1, 2 + (i * 7) % 13)) , 1, (i * 7) % 13) for i in range(n)]


def _ids(batch):
    return [tuple(e.input_ids) + (id(e),) for e in batch]


def test_seeded_and_resumable():
    pools = {"safe": _pool(10), "unsafe": _pool(7), "retain": _pool(5)}
    a = StepSampler(pools, {"safe": 3, "unsafe": 2, "retain": 2}, seed=1)
    b = StepSampler(pools, {"safe": 3, "unsafe": 2, "retain": 2}, seed=1)
    steps_a = [a.next() for _ in range(9)]
    for _ in range(4):
        b.next()
    state = b.state_dict()
    c = StepSampler(pools, {"safe": 3, "unsafe": 2, "retain": 2}, seed=1)
    c.load_state_dict(state)
    for want in steps_a[4:]:
        got = c.next()
        assert all(_ids(got[s]) == _ids(want[s]) for s in want)
    other = StepSampler(pools, {"safe": 3, "unsafe": 2, "retain": 2}, seed=2)
    assert any(_ids(other.next()["safe"]) != _ids(s["safe"]) for s in steps_a[:1])


def test_each_epoch_covers_every_row_and_ranks_are_disjoint():
    pools = {"safe": _pool(8)}
    r0 = StepSampler(pools, {"safe": 2}, seed=0, rank=0, world=2)
    r1 = StepSampler(pools, {"safe": 2}, seed=0, rank=1, world=2)
    seen = []
    for _ in range(2):  # 2 steps x 2 ranks x 2 rows = one epoch of 8
        x, y = r0.next()["safe"], r1.next()["safe"]
        assert not {id(e) for e in x} & {id(e) for e in y}
        seen += x + y
    assert sorted(id(e) for e in seen) == sorted(id(e) for e in pools["safe"])


def test_length_bucketing_reduces_padding():
    pool = [Encoded([1] * n, 1, n - 1) for n in [2, 40, 3, 38, 4, 41, 5, 39] * 8]
    def waste(bucketing):
        s = StepSampler({"safe": pool}, {"safe": 4}, seed=0, bucketing=bucketing, bucket_batches=8)
        total = 0
        for _ in range(16):
            lens = [len(e.input_ids) for e in s.next()["safe"]]
            total += sum(max(lens) - n for n in lens)
        return total
    assert waste(True) < waste(False) / 3


def test_pairs_follow_unsafe_rows_and_missing_splits_raise():
    rows = make_rows()
    by = split_rows(rows, ["safe", "unsafe", "pair"])
    assert [r["pair_id"] for r in by["unsafe"]] == [r["pair_id"] for r in by["pair"]]
    assert all(r["kind"] == "refusal" for r in by["pair"])
    with pytest.raises(RepbendError, match="no 'unsafe' rows"):
        split_rows(make_rows(unsafe=False), ["safe", "unsafe"])
    pools = {"unsafe": _pool(4), "pair": _pool(4, 1)}
    step = StepSampler(pools, {"unsafe": 2}, seed=0).next()
    assert [pools["unsafe"].index(e) for e in step["unsafe"]] == [pools["pair"].index(e) for e in step["pair"]]


def test_collate_splits_pads_once_to_the_longest_row():
    items = {"safe": [Encoded([1, 2, 3], 2, 1)], "unsafe": [Encoded([4, 5], 1, 1), Encoded([6] * 6, 3, 3)]}
    batch, spans = collate_splits(items, pad_id=0)
    assert batch.input_ids.shape == (3, 6) and spans == {"safe": slice(0, 1), "unsafe": slice(1, 3)}
    assert int(batch.attention_mask.sum()) == 11


def test_repeat_kinds_oversamples_rows_of_a_kind_and_keeps_pairs_aligned():
    rows = make_rows()
    assert repeat_kinds(rows, {}) == rows
    out = repeat_kinds(rows, {"benign": 3, "harmful": 2})
    count = lambda rs, kind: sum(r["kind"] == kind for r in rs)
    assert count(out, "benign") == 3 * count(rows, "benign")
    assert count(out, "harmful") == 2 * count(rows, "harmful")
    assert count(out, "refusal") == count(rows, "refusal")
    by = split_rows(out, ["safe", "unsafe", "retain", "pair"])
    assert [r["pair_id"] for r in by["unsafe"]] == [r["pair_id"] for r in by["pair"]]
    assert len(by["retain"]) == 3 * len(split_rows(rows, ["retain"])["retain"])
    with pytest.raises(RepbendError, match=r"kind\(s\) \['overrefusal'\].*kinds present: \['benign', 'harmful', 'refusal'\]"):
        repeat_kinds(rows, {"overrefusal": 2})
    only_retain = repeat_kinds(rows, {"retain/benign": 4, "benign": 2})  # split/kind beats kind
    n = lambda rs, split: sum(r["split"] == split and r["kind"] == "benign" for r in rs)
    assert n(only_retain, "retain") == 4 * n(rows, "retain") and n(only_retain, "safe") == 2 * n(rows, "safe")
    with pytest.raises(RepbendError, match=r"\['unsafe/benign'\]"):
        repeat_kinds(rows, {"unsafe/benign": 2})


def test_paired_refusals_join_the_safe_rows_of_the_same_step():
    """paired_refusals k: the refusals of the step's first k unsafe rows (same pair_id) follow batch_size.safe - k
    drawn safe rows; unsafe rows without a refusal leave the pool."""
    rows = make_rows() + [{"id": "lone", "split": "unsafe", "kind": "harmful", "messages": [{"role": "user",
                           "content": "x"}], "response": "y", "source": "t", "pair_id": "nobody"}]
    by = split_rows(rows, ["safe", "unsafe", "retain"], paired=True)
    assert [r["pair_id"] for r in by["paired"]] == [r["pair_id"] for r in by["unsafe"]]
    assert all(r["kind"] == "refusal" for r in by["paired"]) and "nobody" not in {r["pair_id"] for r in by["unsafe"]}
    # rows stand in for encodings so the test can read pair_ids back
    pools = {s: [Encoded([i + 1], 1, 0) for i in range(len(r))] for s, r in by.items()}
    ident = {s: {id(e): r for e, r in zip(pools[s], by[s])} for s in pools}
    sampler = StepSampler(pools, {"safe": 3, "unsafe": 3, "retain": 2}, seed=0, paired_refusals=2)
    for _ in range(5):
        step = sampler.next()
        assert [len(step[s]) for s in ("safe", "unsafe", "retain")] == [3, 3, 2]
        unsafe_ids = [ident["unsafe"][id(e)]["pair_id"] for e in step["unsafe"]]
        refusals = [ident["paired"][id(e)] for e in step["safe"][1:]]
        assert [r["pair_id"] for r in refusals] == unsafe_ids[:2] and all(r["kind"] == "refusal" for r in refusals)
    # every safe row a paired refusal: nothing is drawn from the safe pool
    only = StepSampler(pools, {"safe": 2, "unsafe": 2, "retain": 1}, seed=0, paired_refusals=2).next()
    assert all(id(e) in ident["paired"] for e in only["safe"])


def test_draws_without_the_new_options_follow_the_documented_order():
    """paired_refusals 0 (the default config): each split's rows come in the documented order, each epoch sorted by
    a hash of (seed, split, epoch, row id), batch_size rows a step, untouched by the pairing option."""
    import hashlib

    by = split_rows(make_rows(), ["safe", "unsafe", "retain"])
    assert split_rows(make_rows(), ["safe", "unsafe", "retain"], paired=False) == by and "paired" not in by
    pools = {s: _pool(len(r)) for s, r in by.items()}
    ids = {s: [r["id"] for r in rows] for s, rows in by.items()}
    sampler = StepSampler(pools, {"safe": 2, "unsafe": 2, "retain": 2}, seed=5, paired_refusals=0, ids=ids)
    steps = [sampler.next() for _ in range(12)]
    for split in ("safe", "unsafe", "retain"):
        rank = lambda e, k: hashlib.blake2b(f"5|{split}|{e}|{k}".encode(), digest_size=8).digest()  # noqa: E731
        order = [i for e in range(30) for i in sorted(range(len(ids[split])), key=lambda i: rank(e, ids[split][i]))]
        want = [pools[split][i] for i in order[:24]]
        assert [id(e) for st in steps for e in st[split]] == [id(e) for e in want]


@pytest.mark.parametrize("bucketing", [False, True])
def test_a_pool_holding_the_first_rows_of_the_order_draws_the_same_rows(bucketing):
    """Any subset of a pool that keeps the rows the whole pool's first draws take (whole bucketing windows with
    length bucketing) draws the same rows in the same order: what a budgeted data build relies on."""
    from repbend.data.order import draw_order

    ids = [f"req{i}#safe" for i in range(200)]
    whole = {"safe": [Encoded([1] * (2 + i % 17), 1, 1 + i % 17) for i in range(200)]}
    steps, bs, windows = 10, 3, 4   # 30 rows drawn; bucketing windows of 4 batches = 12 rows -> 36 rows needed
    first = draw_order(ids, 7, "safe", 0)[:36 if bucketing else 30]
    rest = [i for i in draw_order(ids, 7, "safe", 0)[36:] if i % 3 == 0]   # a subset keeps some later rows too
    keep = sorted(set(first.tolist()) | set(rest))
    part = {"safe": [whole["safe"][i] for i in keep]}
    opts = dict(seed=7, bucketing=bucketing, bucket_batches=windows)
    a = StepSampler(whole, {"safe": bs}, ids={"safe": ids}, **opts)
    b = StepSampler(part, {"safe": bs}, ids={"safe": [ids[i] for i in keep]}, **opts)
    for _ in range(steps):
        assert [id(e) for e in a.next()["safe"]] == [id(e) for e in b.next()["safe"]]


def test_width_groups_give_short_and_long_splits_their_own_pass():
    def rows(*lengths):
        return [Encoded([1] * n, 1, n - 1) for n in lengths]

    items = {"safe": rows(40, 42), "unsafe": rows(100, 104), "retain": rows(138, 140)}
    assert width_groups(items) == [["safe"], ["unsafe"], ["retain"]]
    # nearly equal widths share a pass; a large per-pass overhead puts everything in one
    assert width_groups({"safe": rows(100, 101), "unsafe": rows(102), "retain": rows(300)}) == [["safe", "unsafe"], ["retain"]]
    assert width_groups(items, overhead=10_000) == [["safe", "unsafe", "retain"]]
    groups = collate_groups(items, 0, width_groups(items))
    assert [tuple(b.input_ids.shape) for b, _ in groups] == [(2, 42), (2, 104), (2, 140)]
    assert collate_groups(items, 0)[0][0].input_ids.shape == (6, 140)


def test_passes_by_length_only_in_a_single_process():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from repbend.errors import ConfigError
    from repbend.training.trainer import resolve_passes

    single, ddp = SimpleNamespace(distributed_type=DistributedType.NO), SimpleNamespace(distributed_type=DistributedType.MULTI_GPU)
    assert resolve_passes("auto", single) and resolve_passes("by_length", single)
    assert not resolve_passes("auto", ddp) and not resolve_passes("one", single)
    with pytest.raises(ConfigError, match="data.passes=by_length.*auto or one"):
        resolve_passes("by_length", ddp)
