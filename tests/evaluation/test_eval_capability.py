"""Capability: MMLU scoring plumbing on a 4-question fixture, benign KL/perplexity, GSM8K parsing."""
from __future__ import annotations

import math

import pytest
import torch

from repbend.errors import RepbendError
from repbend.evaluation.capability import (CapabilityConfig, benign_kl, evaluate_capability, format_question,
                                           last_number, letter_token_ids, mmlu_accuracy, mmlu_prompt,
                                           next_token_logprobs, balanced_subset)

FIXTURE = [
    {"question": "What is 2 + 2?", "answer_a": "3", "answer_b": "4", "answer_c": "5", "answer_d": "22",
     "correct_answer": "B", "topic": "elementary mathematics"},
    {"question": "Capital of France?", "answer_a": "Paris", "answer_b": "Rome", "answer_c": "Berlin",
     "answer_d": "Madrid", "correct_answer": "A", "topic": "geography"},
    {"question": "Which is a mammal?", "answer_a": "Shark", "answer_b": "Trout", "answer_c": "Whale",
     "answer_d": "Eel", "correct_answer": "C", "topic": "biology"},
    {"question": "Boiling point of water at sea level in Celsius?", "answer_a": "50", "answer_b": "80",
     "answer_c": "90", "answer_d": "100", "correct_answer": "D", "topic": "physics"},
]
ROWS = [{"messages": [{"role": "user", "content": "How do I bake bread?"}],
         "response": "Mix flour, water, yeast and salt, knead, let it rise and bake."},
        {"messages": [{"role": "user", "content": "What is the capital of France?"}],
         "response": "The capital of France is Paris."}]


def test_prompt_format():
    q = format_question(FIXTURE[0])
    assert q.endswith("D. 22\nAnswer:") and "B. 4" in q
    p = mmlu_prompt(FIXTURE[0], [FIXTURE[1]], None, "plain")
    assert "about elementary mathematics" in p and "Answer: A\n\n" in p and p.endswith("Answer:")


def test_balanced_subset_is_balanced_and_seeded():
    rows = [{"topic": t, "i": i} for t in "abc" for i in range(10)]
    s = balanced_subset(rows, 6, seed=1)
    assert sorted(r["topic"] for r in s) == ["a", "a", "b", "b", "c", "c"]
    assert s == balanced_subset(rows, 6, seed=1) and s != balanced_subset(rows, 6, seed=2)
    assert len(balanced_subset(rows, 100)) == 30


def test_left_padded_batch_matches_single_forward(tiny_model, tiny_tokenizer):
    prompts = ["What is the capital of France? Answer:", "Hi"]
    lp = next_token_logprobs(tiny_model, tiny_tokenizer, prompts)
    for i, p in enumerate(prompts):
        ids = torch.tensor([tiny_tokenizer(p, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            ref = torch.log_softmax(tiny_model(input_ids=ids).logits[0, -1], -1)
        assert torch.allclose(lp[i], ref, atol=1e-4)


@pytest.mark.parametrize("fmt", ["plain", "chat"])
def test_mmlu_accuracy_matches_argmax_over_letters(tiny_model, tiny_tokenizer, fmt):
    res = mmlu_accuracy(tiny_model, tiny_tokenizer, n=4, rows=FIXTURE, batch_size=3, fmt=fmt, method="letters",
                        progress=False)
    assert res["n"] == 4 and set(res["per_topic"]) == {r["topic"] for r in FIXTURE}
    letters = letter_token_ids(tiny_tokenizer)
    scores = []
    for r in FIXTURE:   # recompute each question alone, unbatched
        lp = next_token_logprobs(tiny_model, tiny_tokenizer, [mmlu_prompt(r, [], tiny_tokenizer, fmt)])[0]
        scores.append([torch.logsumexp(lp[letters[k]], -1).item() for k in range(4)])
    s = torch.tensor(scores)
    gold = torch.tensor(["ABCD".index(r["correct_answer"]) for r in FIXTURE])
    assert res["accuracy"] == pytest.approx((s.argmax(-1) == gold).float().mean().item())
    calibrated = (s - s.mean(0)).argmax(-1)                  # letter prior removed
    assert res["accuracy_calibrated"] == pytest.approx((calibrated == gold).float().mean().item())
    assert sum(res["predicted"].values()) == 4 and res["gold"] == {"A": 1, "B": 1, "C": 1, "D": 1}


def test_benign_kl_adapter_disabled_reference(tiny_model, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    r0 = benign_kl(model, None, tiny_tokenizer, ROWS, progress=False)
    assert r0["kl"] == pytest.approx(0.0, abs=1e-6) and r0["ppl"] == pytest.approx(r0["ppl_reference"], rel=1e-5)
    with torch.no_grad():       # move the adapter away from its zero init: now the model differs from the base
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    r1 = benign_kl(model, None, tiny_tokenizer, ROWS, progress=False)
    assert r1["kl"] > 1e-4 and r1["ppl"] != pytest.approx(r1["ppl_reference"])
    assert r1["ppl_reference"] == pytest.approx(r0["ppl_reference"], rel=1e-5)
    assert r1["tokens"] == r0["tokens"] > 0


def test_benign_kl_hand_computed_against_other_model(tiny_tokenizer):
    from conftest import build_tiny_model
    from repbend.data.chat import encode

    a, b = build_tiny_model(tiny_tokenizer, seed=0), build_tiny_model(tiny_tokenizer, seed=1)
    r = benign_kl(a, b, tiny_tokenizer, ROWS[:1], progress=False)
    e = encode(tiny_tokenizer, ROWS[0]["messages"], ROWS[0]["response"])
    ids = torch.tensor([e.input_ids])
    with torch.no_grad():
        la = torch.log_softmax(a(input_ids=ids).logits[0], -1)
        lb = torch.log_softmax(b(input_ids=ids).logits[0], -1)
    pos = range(e.request_len - 1, len(e.input_ids) - 1)      # positions predicting the response tokens
    kl = sum((lb[t].exp() * (lb[t] - la[t])).sum().item() for t in pos) / len(pos)
    nll = -sum(la[t, e.input_ids[t + 1]].item() for t in pos) / len(pos)
    assert r["kl"] == pytest.approx(kl, rel=1e-4) and r["ppl"] == pytest.approx(math.exp(nll), rel=1e-4)
    assert r["tokens"] == e.response_len


def test_benign_kl_needs_reference(tiny_model, tiny_tokenizer):
    with pytest.raises(RepbendError, match="reference"):
        benign_kl(tiny_model, None, tiny_tokenizer, ROWS, progress=False)
    with pytest.raises(RepbendError, match="non-empty"):
        benign_kl(tiny_model, tiny_model, tiny_tokenizer, [{"messages": ROWS[0]["messages"], "response": ""}])


def test_evaluate_capability_without_reference(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    import repbend.evaluation.capability as cap

    monkeypatch.setattr(cap, "load_mmlu", lambda: FIXTURE)     # no wheel in the isolated test cache
    values = evaluate_capability(tiny_model, tiny_tokenizer, {"mmlu_n": 4, "benign_n": 2, "benign_max_new_tokens": 4,
                                                             "mmlu_calibrate": True},
                                 out_dir=tmp_path, progress=False)
    assert {"mmlu", "mmlu_raw"} <= set(values) <= {"mmlu", "mmlu_raw", "benign_ppl"} and 0 <= values["mmlu"] <= 1
    details = __import__("json").loads((tmp_path / "capability.json").read_text())
    assert "skipped" in details["benign_kl"] and details["mmlu"]["n"] == 4   # no reference for a plain model


def test_config_errors_name_the_field():
    with pytest.raises(RepbendError, match="mmlu_k_shot"):
        evaluate_capability(None, None, {"mmlu_k_shot": 9})
    with pytest.raises(RepbendError, match="unknown key"):
        evaluate_capability(None, None, {"mmlu_size": 9})
    assert CapabilityConfig().mmlu_n == 500


def test_last_number():
    assert last_number("so the answer is 1,234.5 dollars") == 1234.5
    assert last_number("#### -7") == -7 and last_number("none") is None


def test_option_logprobs_match_full_forward(tiny_model, tiny_tokenizer):
    """Shared-prefix KV-cache scoring equals scoring each prompt + option in one plain forward."""
    from repbend.evaluation.capability import option_logprobs

    prompts = ["Question: What is 2+2?\nAnswer:", "Q: capital?\nA:"]
    options = [["3", "four", "a large number", "5"], ["Paris", "Rome city", "Berlin", "the city of Madrid"]]
    got = option_logprobs(tiny_model, tiny_tokenizer, prompts, options)
    for i, p in enumerate(prompts):
        for k, o in enumerate(options[i]):
            pi = tiny_tokenizer(p, add_special_tokens=False)["input_ids"]
            oi = tiny_tokenizer(" " + o, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                lp = torch.log_softmax(tiny_model(input_ids=torch.tensor([pi + oi])).logits[0].float(), -1)
            ref = sum(lp[len(pi) - 1 + t, oi[t]].item() for t in range(len(oi)))
            assert got[i, k].item() == pytest.approx(ref, abs=1e-3)


def test_length_groups_cut_where_padding_costs_more_than_a_call():
    from repbend.evaluation.capability import length_groups

    assert length_groups([50, 1, 1, 1], overhead=16) == [[1, 2, 3], [0]]      # 3 + 16 + 50 + 16 < 4 x 50 + 16
    assert length_groups([3, 2, 3, 2], overhead=16) == [[1, 3, 0, 2]]         # padding cheaper than a call
    assert length_groups([3, 1, 2], overhead=0) == [[1], [2], [0]]
    assert sorted(j for g in length_groups(list(range(40, 0, -1)), 8) for j in g) == list(range(40))
    assert length_groups([], 16) == []


@pytest.mark.parametrize("overhead", [0, 10**6])
def test_option_logprobs_grouped_by_length_equal_one_padded_pass(tiny_model, tiny_tokenizer, overhead):
    """Options split into length groups (overhead 0: one group per length) score as in one padded pass."""
    from repbend.evaluation.capability import option_logprobs

    prompts = ["Question: What is 2+2?\nAnswer:", "Q: capital?\nA:", "Name a colour."]
    options = [["3", "four", "a large number that is bigger than all the others", "5"],
               ["Paris", "Rome city", "Berlin", "the city of Madrid in Spain"], ["red", "a", "blue sky", "green"]]
    one = option_logprobs(tiny_model, tiny_tokenizer, prompts, options, group_overhead=10**6)
    got = option_logprobs(tiny_model, tiny_tokenizer, prompts, options, group_overhead=overhead)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, one, atol=1e-4, rtol=1e-5)


def test_mmlu_cloze_method(tiny_model, tiny_tokenizer):
    from repbend.evaluation.capability import cloze_prompt, option_logprobs

    res = mmlu_accuracy(tiny_model, tiny_tokenizer, n=4, rows=FIXTURE, batch_size=4, method="cloze", progress=False)
    chat = mmlu_accuracy(tiny_model, tiny_tokenizer, n=4, rows=FIXTURE, method="cloze", fmt="chat", progress=False)
    assert 0 <= chat["accuracy"] <= 1 and chat["format"] == "chat"
    assert res["method"] == "cloze" and res["n"] == 4
    prompt = cloze_prompt(FIXTURE[0], [], tiny_tokenizer)
    assert prompt.endswith("Question: What is 2 + 2?\nAnswer:") and "B. 4" not in prompt
    correct = 0
    for r in FIXTURE:
        opts = [r["answer_" + L] for L in "abcd"]
        total = option_logprobs(tiny_model, tiny_tokenizer, [cloze_prompt(r, [], tiny_tokenizer)], [opts])[0]
        per_char = total / torch.tensor([len(o) + 1 for o in opts], dtype=torch.float)
        correct += "ABCD"[int(per_char.argmax())] == r["correct_answer"]
    assert res["accuracy"] == correct / 4


def test_benign_kl_against_itself_runs_the_model_once(tiny_tokenizer):
    """The original model has no reference: its perplexity takes one forward pass per batch, equal to a copy's."""
    import copy

    from conftest import build_tiny_model

    model = build_tiny_model(tiny_tokenizer, seed=0)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    same = benign_kl(model, model, tiny_tokenizer, ROWS, batch_size=8, progress=False)
    assert len(calls) == 1 and same["kl"] == 0.0
    other = benign_kl(model, copy.deepcopy(model), tiny_tokenizer, ROWS, batch_size=8, progress=False)
    assert other["ppl"] == pytest.approx(same["ppl"], rel=1e-6) and other["ppl_reference"] == pytest.approx(same["ppl"])
