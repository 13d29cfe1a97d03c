"""load_built: schema checked on read; one-line errors naming file and line."""
from __future__ import annotations

import json

import pytest

from repbend.data.dataset import load_built
from repbend.errors import RepbendError
from repbend.io import atomic_write_json, sha256_file


def good_rows():
    msg = lambda t: [{"role": "user", "content": t}]  # noqa: E731
    return [
        {"id": "a#refusal:r1", "split": "safe", "kind": "refusal", "messages": msg("harm"), "response": "No.",
         "source": "advbench", "pair_id": "a"},
        {"id": "a#harmful", "split": "unsafe", "kind": "harmful", "messages": msg("harm"), "response": "Sure, ...",
         "source": "advbench", "pair_id": "a"},
        {"id": "a#model_refusal", "split": "safe", "kind": "refusal", "messages": msg("harm"),
         "response": "I can't.", "source": "advbench", "pair_id": "a"},
        {"id": "b#safe", "split": "safe", "kind": "benign", "messages": msg("bread?"), "response": "Knead.",
         "source": "project_benign", "pair_id": None},
        {"id": "b#retain", "split": "retain", "kind": "benign", "messages": msg("bread?"), "response": "Knead.",
         "source": "project_benign", "pair_id": None},
    ]


def write(d, rows, val=(), manifest=True):
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (d / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val), encoding="utf-8")
    if manifest:
        atomic_write_json(d / "manifest.json", {"format": "repbend-built-dataset/1", "outputs": {}})
    return d


def test_load_good_folder_rows_and_pairs(tmp_path):
    ds = load_built(write(tmp_path / "ds", good_rows(), val=good_rows()[3:4]))
    assert [r["id"] for r in ds.rows("safe")] == ["a#refusal:r1", "a#model_refusal", "b#safe"]
    assert len(ds.rows("unsafe")) == 1 and len(ds.rows("retain")) == 1
    assert [r["id"] for r in ds.rows("safe", part="val")] == ["b#safe"]
    (safe, unsafe), = ds.pairs()
    assert safe["id"] == "a#refusal:r1" and unsafe["id"] == "a#harmful"
    assert len(ds) == 6
    with pytest.raises(RepbendError, match="Unknown split 'pair'"):
        ds.rows("pair")


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.pop("pair_id"), r"line 2: missing field\(s\) \['pair_id'\]"),
    (lambda r: r.update(extra=1), r"line 2: .*extra field\(s\) \['extra'\]"),
    (lambda r: r.update(split="pair"), "line 2: split must be one of"),
    (lambda r: r.update(kind="benign"), "line 2: kind 'benign' cannot be in split 'unsafe'"),
    (lambda r: r.update(response=" "), "line 2: response must be a non-empty string"),
    (lambda r: r.update(messages=[{"role": "user"}]), "line 2: messages must be"),
    (lambda r: r.update(pair_id=3), "line 2: pair_id must be"),
])
def test_schema_errors_name_file_and_line(tmp_path, edit, message):
    rows = good_rows()
    edit(rows[1])
    d = write(tmp_path / "ds", rows)
    with pytest.raises(RepbendError, match=message) as e:
        load_built(d)
    assert "train.jsonl" in str(e.value) and "\n" not in str(e.value)


def test_empty_non_utf8_bad_json_duplicates_and_missing_manifest(tmp_path):
    d = write(tmp_path / "empty", [])
    with pytest.raises(RepbendError, match="train.jsonl has no rows"):
        load_built(d)
    d = write(tmp_path / "latin", good_rows())
    (d / "train.jsonl").write_bytes((d / "train.jsonl").read_bytes().replace(b"Knead", b"Kn\xe9ad"))
    with pytest.raises(RepbendError, match="not UTF-8"):
        load_built(d)
    d = write(tmp_path / "json", good_rows())
    with (d / "train.jsonl").open("a") as f:
        f.write("{oops\n")
    with pytest.raises(RepbendError, match="line 6 is not valid JSON"):
        load_built(d)
    d = write(tmp_path / "dup", good_rows() + good_rows()[:1])
    with pytest.raises(RepbendError, match="line 6: duplicate id"):
        load_built(d)
    d = write(tmp_path / "unfinished", good_rows(), manifest=False)
    with pytest.raises(RepbendError, match="no manifest.json"):
        load_built(d)
    with pytest.raises(RepbendError, match="does not exist"):
        load_built(tmp_path / "nope")


def test_checksum_mismatch_is_detected(tmp_path):
    d = write(tmp_path / "ds", good_rows())
    atomic_write_json(d / "manifest.json", {"outputs": {"train.jsonl": {"sha256": sha256_file(d / "train.jsonl")}}})
    load_built(d)
    with (d / "train.jsonl").open("a") as f:
        f.write(json.dumps({**good_rows()[3], "id": "c#safe"}) + "\n")
    with pytest.raises(RepbendError, match="differs from the checksum"):
        load_built(d)
    assert len(load_built(d, verify_checksums=False).train) == 6
