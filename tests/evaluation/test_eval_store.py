import json

import pytest

from repbend.errors import RepbendError
from repbend.evaluation.store import Store, completion_key, make_key
from repbend.evaluation.types import GenSettings


def test_put_get_and_reopen(tmp_path):
    s = Store(tmp_path / "c.jsonl")
    s.put("a", {"text": "x"})
    s.put_many([("b", {"text": "y"}), ("c", {"text": "z"})])
    assert s.get("a")["text"] == "x" and "b" in s and s.get("nope") is None
    again = Store(tmp_path / "c.jsonl")
    assert len(again) == 3 and again.get("c")["text"] == "z"


def test_truncated_tail_is_dropped_and_appends_stay_valid(tmp_path):
    p = tmp_path / "c.jsonl"
    s = Store(p)
    s.put("a", {"text": "x"})
    with p.open("a") as f:
        f.write('{"key": "b", "text": "half')      # crash mid-write
    s2 = Store(p)
    assert s2.dropped_tail and len(s2) == 1
    s2.put("c", {"text": "z"})
    rows = [json.loads(line) for line in p.read_text().splitlines()]
    assert [r["key"] for r in rows] == ["a", "c"]


def test_corrupt_middle_line_is_a_user_error(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(RepbendError, match="line 2"):
        Store(p)


def test_keys_depend_on_every_part():
    base = dict(fingerprint="f", attack="direct", variant="", messages=[{"role": "user", "content": "hi"}],
                prefill="", settings=GenSettings(), sample=0)
    k = completion_key(**base)
    assert k == completion_key(**dict(base))
    for field, value in [("fingerprint", "g"), ("attack", "prefill"), ("variant", "v"), ("prefill", "Sure"),
                         ("messages", [{"role": "user", "content": "ho"}]),
                         ("settings", GenSettings(max_new_tokens=8)), ("sample", 1)]:
        assert completion_key(**{**base, field: value}) != k, field
    assert make_key({"a": 1, "b": 2}) == make_key({"b": 2, "a": 1})
