"""Core: config loading/overrides/errors, registry did-you-mean, atomic I/O, CLI error handling."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import Field

from repbend.config import Section, apply_overrides, load_config
from repbend.errors import ConfigError, RepbendError
from repbend.io import append_jsonl, atomic_write_json, read_jsonl
from repbend.registry import Registry


class Inner(Section):
    lr: float = Field(1e-5, gt=0)
    steps: int = Field(10, ge=1)


class Outer(Section):
    name: str = "x"
    training: Inner = Field(default_factory=Inner)
    items: list[dict] = Field(default_factory=lambda: [{"a": 1}, {"a": 2}])


def test_overrides_parse_yaml_values_and_index_lists():
    out = apply_overrides({"training": {"lr": 1.0}, "items": [{"a": 1}, {"a": 2}]},
                          ["training.lr=0.5", "training.steps=3", "items.1.a=7", "name=[1, 2]"])
    assert out == {"training": {"lr": 0.5, "steps": 3}, "items": [{"a": 1}, {"a": 7}], "name": [1, 2]}


@pytest.mark.parametrize("bad, fragment", [
    ("training.lr", "must look like"),
    ("items.5.a=1", "is a list of 2"),
    ("name.sub=1", "is a value, not a section"),
])
def test_bad_overrides_are_one_line_errors(bad, fragment):
    with pytest.raises(ConfigError, match=fragment):
        apply_overrides({"name": "x", "items": [{}, {}]}, [bad])


def test_every_field_error_reported_at_once(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("training: {lr: -1, stepz: 3}\nbogus: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(Outer, p)
    msg = str(e.value)
    assert "training.lr" in msg and "training.stepz: unknown key" in msg and "bogus: unknown key" in msg
    assert "\n" not in msg


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, p)


def test_registry_did_you_mean_and_lazy_entries():
    reg: Registry = Registry("widget")
    reg.register("alpha_one", "json:dumps")
    assert reg.get("alpha_one") is json.dumps
    with pytest.raises(RepbendError, match=r"Did you mean 'alpha_one'\?.*Available: alpha_one"):
        reg.get("alpha_on")
    with pytest.raises(ValueError):
        reg.register("Bad-Name", object)
    with pytest.raises(ValueError):
        reg.register("alpha_one", object)


def test_atomic_json_and_truncated_jsonl_tail(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert not list(tmp_path.glob(".a.json.*"))
    f = tmp_path / "r.jsonl"
    append_jsonl(f, {"i": 1})
    with f.open("a") as h:
        h.write('{"i": 2, "trunc')
    assert read_jsonl(f, tolerate_truncated_tail=True) == [{"i": 1}]
    with pytest.raises(RepbendError, match="line 2 is not valid JSON"):
        read_jsonl(f)


def test_cli_user_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "repbend.cli", "validate", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error:")


def test_cli_help_lists_commands():
    proc = subprocess.run([sys.executable, "-m", "repbend.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for cmd in ("models", "chat", "data", "train", "validate", "merge", "eval", "report", "judge", "demo", "compare"):
        assert cmd in proc.stdout
