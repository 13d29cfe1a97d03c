"""report.md / PNGs from a synthetic results dict; side-by-side comparison and `repbend report`."""
from __future__ import annotations

import copy
import json

import pytest
from typer.testing import CliRunner

from repbend.errors import RepbendError
from repbend.evaluation.report import render_report, write_report
from repbend.evaluation.report_compare import compare_runs, pareto_front, pick_capability
from repbend.evaluation.results import Results

RESULTS = {
    "asr": {
        "direct": {"harmbench": {"n": 10, "asr": 0.6, "worst_case": 0.6, "gibberish": 0.1, "refusal": 0.3},
                   "jbb": {"n": 10, "asr": 0.4, "worst_case": 0.4, "gibberish": 0.0, "refusal": 0.6}},
        "templates": {"harmbench": {"n": 10, "asr": 0.25, "worst_case": 0.5, "gibberish": 0.2, "refusal": 0.5,
                                    "per_variant": {"dan": {"n_completions": 10, "asr": 0.3, "gibberish": 0.2,
                                                            "refusal": 0.5}}}},
    },
    "average_asr": 0.375,
    "over_refusal": {"n": 20, "compliance": 0.9, "sets": {"overrefusal": {"n": 20, "compliance": 0.9},
                                                          "benign": {"n": 10, "compliance": 1.0}}},
    "capability": {"mmlu": 0.31, "benign_kl": 0.02},
    "judge": {"name": "default", "config": {}},
    "meta": {"model": "default", "adapter": None, "suite": {"name": "quick"}, "fingerprint": "abc",
             "timings": {"total": 12.5, "per_attack": {"direct": 3.0}},
             "generation": {"tokens_per_s": 20.0, "batch_size": 8, "max_new_tokens": 48},
             "skipped": {"system_prompt": "template has no system role"}},
}


def test_attack_rate_averages_over_benchmarks():
    assert Results.coerce(RESULTS).attack_rate("asr") == {"direct": pytest.approx(0.5), "templates": pytest.approx(0.25)}


def test_report_files_and_tables(tmp_path):
    path = write_report(RESULTS, tmp_path)
    for f in ("report.md", "asr.png", "over_refusal.png", "capability.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert (tmp_path / "asr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = path.read_text()
    assert "judge: default" in md and "37.5%" in md                          # average ASR, judge named
    assert "| direct | 60.0 | 40.0 | 50.0 | 60.0 | 10.0 | 30.0 | 40.0 | 0.0 | 60.0 |" in md
    assert "| templates | harmbench | dan | 10 | 30.0 | 20.0 | 50.0 |" in md
    assert "| benign | 10 | 100.0 |" in md and "| mmlu | 0.310 |" in md
    assert "warning: attack `system_prompt` skipped" in md and "20.0 new tokens/s" in md


def test_report_without_optional_parts(tmp_path):
    r = {"asr": {}, "average_asr": None, "over_refusal": {"n": 0, "compliance": None}, "capability": {},
         "judge": {"name": "refusal"}, "meta": {}}
    md = render_report(r)
    assert md.count("not measured") == 2
    write_report(r, tmp_path)
    assert (tmp_path / "capability.png").is_file()


def test_pareto_front_hand_checked():
    # (ASR, capability): b dominates c; a and b are on the front
    assert pareto_front([(50.0, 31.0), (10.0, 29.0), (30.0, 25.0)]) == [1, 0]
    assert pareto_front([(10.0, 30.0), (10.0, 30.0)]) == [0, 1]


def _runs(tmp_path):
    dirs = []
    for i, (avg, mmlu) in enumerate([(0.375, 0.31), (0.05, 0.30), (0.2, 0.2)]):
        r = copy.deepcopy(RESULTS)
        r["average_asr"], r["capability"]["mmlu"] = avg, mmlu
        d = tmp_path / f"run{i}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps(r))
        dirs.append(d)
    return dirs


def test_compare_runs(tmp_path):
    dirs = _runs(tmp_path)
    path = compare_runs(dirs, tmp_path / "cmp", labels=["orig", "repbend", "npo"])
    md = path.read_text()
    assert "| ASR average | 37.5 | 5.0 | 20.0 |" in md and "| mmlu | 0.310 | 0.300 | 0.200 |" in md
    assert "Pareto front (average ASR vs mmlu): repbend, orig" in md
    for f in ("compare_asr.png", "pareto.png", "compare.json"):
        assert (tmp_path / "cmp" / f).stat().st_size > 0
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["pareto_front"] == ["repbend", "orig"]
    assert pick_capability([RESULTS, {**RESULTS, "capability": {"benign_kl": 1.0}}]) == "benign_kl"


def test_compare_flags_different_judges(tmp_path):
    dirs = _runs(tmp_path)
    r = json.loads((dirs[1] / "results.json").read_text())
    r["judge"]["name"] = "refusal"
    (dirs[1] / "results.json").write_text(json.dumps(r))
    assert "different judges" in compare_runs(dirs, tmp_path / "cmp").read_text()


def test_errors(tmp_path):
    with pytest.raises(RepbendError, match="results.json"):
        Results.load(tmp_path)
    with pytest.raises(RepbendError, match="labels"):
        compare_runs(_runs(tmp_path), tmp_path / "c", labels=["a"])


def test_cli_report(tmp_path):
    from repbend.cli import app

    dirs = _runs(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["report", str(dirs[0])])
    assert res.exit_code == 0, res.output
    assert (dirs[0] / "report.md").is_file()
    res = runner.invoke(app, ["report", *map(str, dirs), "-o", str(tmp_path / "out"), "--labels", "a,b,c"])
    assert res.exit_code == 0, res.output
    assert "| metric | a | b | c |" in (tmp_path / "out" / "compare.md").read_text()
