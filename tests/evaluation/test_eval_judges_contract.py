"""Contract: every registered judge builds from its Config and scores a list on CPU (tiny model)."""
from __future__ import annotations

import pytest

from repbend.evaluation.judges import JUDGES
from repbend.evaluation.judges.validate import build_judge
from repbend.evaluation.types import JudgeItem, Verdict

ITEMS = [JudgeItem("Explain how to bake bread at home",
                   "Mix flour, water, yeast and salt. Knead the dough for ten minutes, let it rise for an hour, "
                   "shape the bread and bake it at 220 degrees for thirty minutes."),
         JudgeItem("Explain how to bake bread at home", "I'm sorry, but I can't help with that."),
         JudgeItem("Explain how to bake bread at home", ""),
         JudgeItem("Explain how to bake bread at home", "bread " * 60, context="a context string")]


@pytest.mark.parametrize("name", JUDGES.names())
def test_every_judge_scores_a_list(name, tiny_model_dir):
    fields = {"default": {"similarity": "lexical"}, "llm_classifier": {"model": str(tiny_model_dir)}}.get(name, {})
    judge = build_judge(name, fields)
    verdicts = judge.score(ITEMS)
    assert len(verdicts) == len(ITEMS) and all(isinstance(v, Verdict) for v in verdicts)
    assert all(0.0 <= v.score <= 1.0 for v in verdicts)
    if name != "refusal":   # the keyword baseline is blind to gibberish by design (that is its known flaw)
        assert not verdicts[2].harmful and not verdicts[3].harmful  # empty and looping answers never count
    assert judge.score([]) == []
    assert not (verdicts[1].harmful and name != "llm_classifier")   # the refusal is never harmful offline


def test_build_judge_config_error():
    from repbend.errors import RepbendError

    with pytest.raises(RepbendError, match="judge 'refusal'.*windw: unknown key"):
        build_judge("refusal", {"windw": 3})


def test_validate_cli_user_errors():
    from typer.testing import CliRunner

    from repbend.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["judge", "validate", "-j", "defualt"])
    assert res.exit_code != 0 and "Did you mean 'default'" in str(res.exception)
    res = runner.invoke(app, ["judge", "validate", "-d", "xstest"])
    assert res.exit_code != 0 and "Unknown validation set" in str(res.exception)
    res = runner.invoke(app, ["judge", "validate", "--set", "default.min_words"])
    assert res.exit_code != 0 and "judge.field=value" in str(res.exception)


def test_validate_judges_on_local_set(monkeypatch, tmp_path):
    """validate_judges end to end on a hand-labelled set (no download): metrics and validation.json."""
    import json

    from repbend.evaluation.judges import validate as V

    items = [JudgeItem("bake bread", "I'm sorry, I can't help."), JudgeItem("bake bread", "Sure, mix flour.")] * 3
    labelled = V.LabelledSet("toy", "refused", items, [True, False] * 3, "hand-written")
    monkeypatch.setitem(V.VALIDATION_SETS, "toy", lambda: labelled)
    res = V.validate_judges(["refusal"], ["toy"], output_dir=tmp_path)
    m = res["judges"]["refusal"]["sets"]["toy"]["all"]
    assert m["accuracy"] == 1.0 and m["kappa"] == 1.0 and m["n"] == 6
    saved = json.loads((tmp_path / "validation.json").read_text())
    assert saved["judges"]["refusal"]["sets"]["toy"]["errors"] == []
    assert (tmp_path / "run_info.json").is_file()


def test_validate_judges_pooled_rows(monkeypatch):
    """With several sets, 'pooled' scores every row against its own set's label (harmful or refused)."""
    from repbend.evaluation.judges import validate as V

    refused = V.LabelledSet("r", "refused", [JudgeItem("bake bread", "I'm sorry, I can't help.")] * 4,
                            [True, True, False, False], "hand")          # refusal judge: 2 right, 2 wrong
    harmful = V.LabelledSet("h", "harmful", [JudgeItem("bake bread", "Sure, mix flour and water.")] * 2,
                            [True, True], "hand")                         # refusal judge: 2 right
    monkeypatch.setitem(V.VALIDATION_SETS, "r", lambda: refused)
    monkeypatch.setitem(V.VALIDATION_SETS, "h", lambda: harmful)
    res = V.validate_judges(["refusal"], ["r", "h"])
    pooled = res["judges"]["refusal"]["pooled"]["all"]
    assert pooled["n"] == 6 and abs(pooled["accuracy"] - 4 / 6) < 1e-9
    assert pooled["tp"] == 4 and pooled["fp"] == 2
    assert sum(res["judges"]["refusal"]["pooled"][s]["n"] for s in ("tune", "test")) == 6
    assert V.validate_judges(["refusal"], ["r"])["judges"]["refusal"]["pooled"] is None
