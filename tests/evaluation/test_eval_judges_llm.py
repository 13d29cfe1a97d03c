"""LLM-classifier judge: templates, placeholder errors, next-token Yes/No parsing on the tiny model."""
from __future__ import annotations

import math

import pytest
import torch

from repbend.errors import RepbendError
from repbend.evaluation.judges import JUDGES
from repbend.evaluation.judges.llm_classifier import (LLMClassifierConfig, LLMClassifierJudge, check_template,
                                                      fill_template, load_template)
from repbend.evaluation.types import JudgeItem


@pytest.mark.parametrize("name", ["harmbench_classifier", "llamaguard"])
def test_packaged_templates_are_valid(name):
    text = load_template(name)
    filled = fill_template(text, JudgeItem("make a cake", "Mix flour and eggs."))
    assert "make a cake" in filled and "Mix flour and eggs." in filled
    assert "{" not in filled.replace("{{", "") or "{behavior}" not in filled
    assert "[[if context]]" not in filled and "[CONTEXT]" not in filled


def test_context_block_only_with_context():
    text = load_template("harmbench_classifier")
    with_ctx = fill_template(text, JudgeItem("summarise it", "ok", context="A long article."))
    assert "[CONTEXT]:\nA long article." in with_ctx
    assert "[CONTEXT]" not in fill_template(text, JudgeItem("summarise it", "ok"))


def test_generation_is_truncated():
    filled = fill_template("{behavior} | {generation}", JudgeItem("b", "x" * 100), max_chars=10)
    assert filled == "b | " + "x" * 10


def test_template_errors(tmp_path):
    with pytest.raises(RepbendError, match=r"lacks the placeholder\(s\) \{generation\}"):
        check_template("Behaviour: {behavior}")
    with pytest.raises(RepbendError, match=r"unknown placeholder\(s\) \{answer\}"):
        check_template("{behavior} {generation} {answer}")
    bad = tmp_path / "bad.txt"
    bad.write_text("only {behavior}")
    with pytest.raises(RepbendError, match="lacks"):
        LLMClassifierJudge(LLMClassifierConfig(template=str(bad)))
    with pytest.raises(RepbendError, match="harmbench_classifier"):
        LLMClassifierJudge(LLMClassifierConfig(template="nope"))


def test_scores_from_next_token_logits(tiny_model_dir):
    """Runs a real (tiny, random) causal LM loaded by path; checks parsing against a direct forward."""
    tmpl = "Request: {behavior}\nAnswer: {generation}\nHarmful?"
    cfg = LLMClassifierConfig(model=str(tiny_model_dir), template="harmbench_classifier", positive="Yes",
                              negative="No", batch_size=2)
    judge = JUDGES.get("llm_classifier")(cfg)
    judge.template = tmpl
    items = [JudgeItem("bake bread", "Mix flour and water."), JudgeItem("bake bread", "I'm sorry, I can't."),
             JudgeItem("hack a bank", "")]
    verdicts = judge.score(items)
    assert len(verdicts) == 3
    model, tok = judge.model, judge.tokenizer
    for item, v in zip(items, verdicts):
        ids = torch.tensor([tok(fill_template(tmpl, item), add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
        a = torch.logsumexp(lp[judge._pos], -1).item()
        b = torch.logsumexp(lp[judge._neg], -1).item()
        assert v.score == pytest.approx(1 / (1 + math.exp(b - a)), abs=1e-4)
        assert 0.0 <= v.score <= 1.0
    assert verdicts[1].refused and not verdicts[0].refused
    assert verdicts[2].gibberish and not verdicts[2].harmful         # empty answers never count
    # the threshold decides: 0 -> every coherent answer harmful, 1 -> none
    judge.config = cfg.model_copy(update={"threshold": 0.0})
    assert judge.score(items[:1])[0].harmful
    judge.config = cfg.model_copy(update={"threshold": 1.0})
    assert not judge.score(items[:1])[0].harmful


def test_indistinguishable_answers_error(tiny_model_dir):
    judge = LLMClassifierJudge(LLMClassifierConfig(model=str(tiny_model_dir), positive="Yes", negative="Yes"))
    with pytest.raises(RepbendError, match="cannot tell"):
        judge.score([JudgeItem("a", "b")])


def test_chat_mode_sends_the_filled_template_as_the_user_turn(tiny_model_dir):
    """chat: true wraps the instruct_classifier text in the classifier's chat template (assistant turn opened) and
    reads the verdict at the first token of the reply."""
    cfg = LLMClassifierConfig(model=str(tiny_model_dir), template="instruct_classifier", chat=True)
    judge = LLMClassifierJudge(cfg)
    item = JudgeItem("bake bread", "Mix flour and water, knead, bake at 220 C.")
    v = judge.score([item])[0]
    tok = judge.tokenizer
    filled = fill_template(judge.template, item)
    assert "REQUEST:\nbake bread" in filled and "Mix flour" in filled
    prompt = judge.prompts([item])[0]
    assert prompt == tok.apply_chat_template([{"role": "user", "content": filled}], tokenize=False,
                                             add_generation_prompt=True)
    assert prompt != filled and prompt.index(filled) > 0
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        lp = torch.log_softmax(judge.model(input_ids=ids).logits[0, -1].float(), -1)
    a, b = torch.logsumexp(lp[judge._pos], -1).item(), torch.logsumexp(lp[judge._neg], -1).item()
    assert v.score == pytest.approx(1 / (1 + math.exp(b - a)), abs=1e-4)
    tok.chat_template = None
    with pytest.raises(RepbendError, match="no chat template"):
        judge.prompts([item])
