"""The results.json model: files round-trip unchanged, readers get typed values, bad files are one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from repbend.cli import main
from repbend.errors import RepbendError
from repbend.evaluation.results import Results

HERE = Path(__file__).parent
OLD = {   # the shape older versions wrote: benign_kl as a dict, cells without worst_case, keys the model does not name
    "asr": {"direct": {"hb": {"n": 4, "n_completions": 4, "asr": 0.5, "gibberish": 0.25, "refusal": 0.25}},
            "templates": {"hb": {"n": 4, "n_completions": 8, "asr": 0.25, "gibberish": 0.0, "refusal": 0.75,
                                 "worst_case": 0.5,
                                 "per_variant": {"a": {"n_completions": 4, "asr": 0.5, "gibberish": 0.0, "refusal": 0.5},
                                                 "b": {"n_completions": 4, "asr": 0.0, "gibberish": 0.0, "refusal": 1.0}}}}},
    "average_asr": 0.375,
    "over_refusal": {"judge": "default", "sets": {"overrefusal": {"n": 2, "compliance": 1.0, "refusal": 0.0,
                                                                  "gibberish": 0.0}}, "n": 2, "compliance": 1.0},
    "capability": {"mmlu": 0.3, "benign_kl": {"kl": 0.02, "n": 8}},
    "judge": {"name": "default", "config": {"window": 240}},
    "meta": {"model": "default", "adapter": None, "suite": {"name": "quick", "config": {}}, "extra_key": [1, 2]},
}


def test_a_file_round_trips_unchanged_and_reads_typed():
    r = Results.coerce(json.loads(json.dumps(OLD)))
    assert json.dumps(r.to_json()) == json.dumps(OLD)            # same keys, values and order
    assert r.attack_rate("asr") == {"direct": 0.5, "templates": 0.25}
    assert r.attack_rate("worst_case") == {"direct": None, "templates": 0.5}
    assert r.benign_kl == 0.02 and r.capability_numbers() == {"mmlu": 0.3}
    assert r.set_rates("overrefusal").compliance == 1.0 and r.set_rates("benign").compliance is None
    assert r.asr["templates"]["hb"].per_variant["b"].refusal == 1.0 and r.judge_name == "default"


@pytest.mark.parametrize("text, fragment", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"asr": {"direct": {"hb": {"asr": "high"}}}, "judge": {"name": "x"}}', "asr.direct.hb.asr"),
    ('{"asr": [], "judge": {"name": "x"}}', "asr"),
    ('{"asr": {}}', "judge"),
    ("\udcff", "not valid JSON"),
])
def test_malformed_results_are_one_line_errors(tmp_path, capsys, text, fragment):
    (tmp_path / "results.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(RepbendError, match=fragment):
        Results.load(tmp_path)
    for argv in (["report", str(tmp_path)], ["report", str(tmp_path), str(tmp_path), "-o", str(tmp_path / "c")]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error:") and err.strip().count("\n") == 0


DEMO = HERE / "fixtures" / "demo-original"     # results.json and report.md written by `repbend demo` (quick profile)


def test_a_demo_results_file_round_trips_byte_for_byte_and_renders_the_same_report():
    from repbend.evaluation.report import render_report

    text = (DEMO / "results.json").read_text(encoding="utf-8")
    results = Results.load(DEMO)
    assert json.dumps(results.to_json(), indent=2, ensure_ascii=False) + "\n" == text
    old = (DEMO / "report.md").read_text(encoding="utf-8").splitlines()
    new = render_report(results).splitlines()
    assert [a for a, b in zip(old, new) if a != b] == [old[-2]] and old[-2].startswith("- report written")
    assert len(old) == len(new)
