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
