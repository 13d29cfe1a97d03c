"""tools/plot_tuning_ledger.py and the ledger it plots (docs/tuning_seed0_rounds17-26.csv)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LEDGER = ROOT / "docs" / "tuning_seed0_rounds17-26.csv"


def test_the_ledger_is_complete_and_agrees_with_the_plots_default_band(load_script):
    rows = list(csv.DictReader(LEDGER.open()))
    assert [r["trial"] for r in rows].count("original") == 1
    for r in rows:
        assert 0 <= float(r["mean_asr"]) <= 100 and 0 <= float(r["overrefusal"]) <= 100, r
        assert r["source"], f"{r['trial']} has no source"
    names = [r["trial"] for r in rows]
    assert len(names) == len(set(names)), "a trial is in the ledger twice"
    default = next(r for r in rows if "(default)" in r["trial"])
    tool = load_script("tools/plot_tuning_ledger.py")
    assert float(default["mean_asr"]) == tool.DEFAULT_SEEDS[0]   # seed 0 of the band is the default's seed-0 point


def test_plots_the_ledger_to_a_png(tmp_path, load_script):
    out = tmp_path / "ledger.png"
    load_script("tools/plot_tuning_ledger.py").main(LEDGER, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_empty_ledger_is_a_one_line_error(tmp_path, load_script):
    empty = tmp_path / "empty.csv"
    empty.write_text("round,trial,mean_asr,overrefusal,source\n")
    with pytest.raises(SystemExit, match="has no rows"):
        load_script("tools/plot_tuning_ledger.py").main(empty, tmp_path / "x.png")


@pytest.mark.parametrize("text, message", [
    ("round,trial,asr,overrefusal\n0,original,58,97.9\n", "lacks the column"),
    ("round,trial,mean_asr,overrefusal\n17,r17,31.3,95.8\n", "no 'original' row")])
def test_a_malformed_ledger_is_a_one_line_error(tmp_path, load_script, text, message):
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    with pytest.raises(SystemExit, match=message):
        load_script("tools/plot_tuning_ledger.py").main(bad, tmp_path / "x.png")
