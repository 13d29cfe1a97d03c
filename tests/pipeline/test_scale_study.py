"""tools/scale_study.py: the scale table, per-seed cut and plot from evaluation folders."""
from __future__ import annotations

import json

import pytest
import yaml


def _res(asr: dict, compliance: float, kl: float | None = None) -> dict:
    return {"asr": {a: {"harmbench": {"n": 4, "asr": v, "gibberish": 0.25 if a == "gcg" else 0.0, "refusal": 1 - v}}
                    for a, v in asr.items()},
            "average_asr": sum(asr.values()) / len(asr), "over_refusal": {"n": 8, "compliance": compliance},
            "capability": {} if kl is None else {"benign_kl": kl}, "judge": {"name": "default"}, "meta": {}}


def _write(d, res):
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(res))
    return str(d)


CORE = ("direct", "prefill", "templates", "embedding", "gcg")


def test_cut_is_per_seed_and_the_table_and_plot_are_written(tmp_path, load_script):
    tool = load_script("tools/scale_study.py")
    orig = _write(tmp_path / "s" / "orig", _res(dict.fromkeys(CORE, 0.8), 0.9))
    s0 = _write(tmp_path / "s" / "rb0", _res(dict.fromkeys(CORE, 0.4), 0.85, 0.02))   # cut 50%
    s1 = _write(tmp_path / "s" / "rb1", _res(dict.fromkeys(CORE, 0.0), 0.80, 0.04))   # cut 100%
    big = _write(tmp_path / "b" / "orig", _res({**dict.fromkeys(CORE, 0.5), "obfuscation": 1.0}, 0.7))
    b0 = _write(tmp_path / "b" / "rb0", _res(dict.fromkeys(CORE, 0.05), 0.7, 0.01))
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"models": [      # listed largest first: sorted by size in the output
        {"name": "Big-1.5B-Instruct", "params_b": 1.5, "original": big, "repbend": [b0]},
        {"name": "Small-135M-Instruct", "params_b": 0.135, "original": orig, "repbend": [s0, s1]}]}))
    assert tool.main([str(study), "-o", str(tmp_path / "out")]) == 0
    data = json.loads((tmp_path / "out" / "scale.json").read_text())["models"]
    small, large = data
    assert small["name"].startswith("Small") and small["n_seeds"] == 2
    assert small["repbend"]["cut"]["mean"] == pytest.approx(0.75) and small["repbend"]["cut"]["std"] == pytest.approx(0.25)
    assert small["repbend"]["kl"]["mean"] == pytest.approx(0.03)
    assert large["original"]["core_asr"] == pytest.approx(0.5)           # obfuscation is not a core attack
    assert large["repbend"]["cut"]["mean"] == pytest.approx(0.9)
    assert small["repbend"]["gibberish"]["mean"] == pytest.approx(0.05)  # mean over the five core attacks
    md = (tmp_path / "out" / "scale.md").read_text()
    assert "| Small-135M-Instruct | 0.135B | 2 | 80.0 | 20.0 ± 20.0 | **75.0 ± 25.0** |" in md
    assert "90.0 -> 82.5 ± 2.5 | -7.5 |" in md
    assert (tmp_path / "out" / "scale.png").stat().st_size > 5000


def test_a_study_without_core_results_or_fields_is_one_line(tmp_path, load_script, capsys):
    tool = load_script("tools/scale_study.py")
    orig = _write(tmp_path / "o", _res({"obfuscation": 0.5}, 0.9))
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"models": [{"name": "m", "params_b": 1, "original": orig, "repbend": [orig]}]}))
    assert tool.main([str(study), "-o", str(tmp_path / "out")]) == 2
    assert "no core attack results" in capsys.readouterr().err
    study.write_text(yaml.safe_dump({"models": [{"name": "m", "original": orig}]}))
    assert tool.main([str(study), "-o", str(tmp_path / "out")]) == 2
    assert "lacks params_b, repbend" in capsys.readouterr().err
