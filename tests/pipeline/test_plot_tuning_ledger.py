"""tools/plot_tuning_ledger.py and the ledger docs/TUNING.md plots (docs/tuning_trials.csv)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LEDGER = ROOT / "docs" / "tuning_trials.csv"
SWEEP = ROOT / "configs" / "tune-default-v2.yaml"
TUNING = ROOT / "docs" / "TUNING.md"


def test_the_ledger_is_consistent_with_its_sweep_file(load_script):
    rows = load_script("tools/plot_tuning_ledger.py").read_ledger(LEDGER)
    assert [r["trial"] for r in rows].count("original") == 1
    for r in rows:
        assert 0 <= float(r["mean_asr"]) <= 100 and 0 <= float(r["overrefusal"]) <= 100, r
        assert r["seeds"] in {"0", "1", "2", "mean"}, r
    keys = [(r["trial"], r["seeds"]) for r in rows]
    assert len(keys) == len(set(keys)), "a trial and seed is in the ledger twice"
    sweep = SWEEP.read_text()
    for r in rows:
        assert r["rerun"] in {"yes", "no"}, r
        if r["trial"] == "original":
            continue
        if r["rerun"] == "yes":      # can be re-run with `repbend tune tune-default-v2 --only NAME@sSEED`
            assert f"name: {r['trial']}\n" in sweep, f"{r['trial']} is not a trial of {SWEEP.name}"
        else:                        # its option was removed from repbend: not in the sweep, and said so
            assert f"name: {r['trial']}\n" not in sweep, f"{r['trial']} is in {SWEEP.name} but marked rerun=no"
    removed = {r["trial"] for r in rows if r["rerun"] == "no"}
    section = TUNING.read_text().split("## Ideas tried and removed", 1)
    assert len(section) == 2, "docs/TUNING.md has no section 'Ideas tried and removed'"
    text = section[1].split("\n## ", 1)[0]
    for name in removed:
        assert f"`{name}`" in text, f"docs/TUNING.md's 'Ideas tried and removed' does not name {name}"
    chosen = [r for r in rows if r["family"] == "chosen"]
    assert len({r["trial"] for r in chosen}) == 1
    per_seed = [float(r["mean_asr"]) for r in chosen if r["seeds"] != "mean"]
    mean = next(float(r["mean_asr"]) for r in chosen if r["seeds"] == "mean")
    assert abs(sum(per_seed) / len(per_seed) - mean) < 0.1   # the chosen config's mean is the mean of its seeds


def test_plots_the_ledger_to_a_png(tmp_path, load_script):
    out = tmp_path / "ledger.png"
    load_script("tools/plot_tuning_ledger.py").main(LEDGER, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_empty_ledger_is_a_one_line_error(tmp_path, load_script):
    empty = tmp_path / "empty.csv"
    empty.write_text("family,trial,finetune,seeds,mean_asr,overrefusal\n")
    with pytest.raises(SystemExit, match="has no rows"):
        load_script("tools/plot_tuning_ledger.py").main(empty, tmp_path / "x.png")


@pytest.mark.parametrize("text, message", [
    ("family,trial,finetune,seeds,asr,overrefusal\noriginal,original,none,0,58,97.9\n", "lacks the column"),
    ("family,trial,finetune,seeds,mean_asr,overrefusal\nchosen,x,full,0,31.3,95.8\n", "no 'original' row")])
def test_a_malformed_ledger_is_a_one_line_error(tmp_path, load_script, text, message):
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    with pytest.raises(SystemExit, match=message):
        load_script("tools/plot_tuning_ledger.py").main(bad, tmp_path / "x.png")
