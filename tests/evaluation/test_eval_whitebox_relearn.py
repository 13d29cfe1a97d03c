"""Re-learning attack: checkpoints 0, k/2, k; caller's model untouched; training data disjoint; resume."""
from __future__ import annotations

import json

import pytest
import torch

from repbend.errors import RepbendError
from repbend.evaluation.attacks import ATTACKS
from repbend.evaluation.suites import build
from repbend.evaluation.attacks import whitebox_common as wb
from repbend.evaluation.attacks.relearn import Relearn, RelearnConfig, sft_batch, training_pairs
from repbend.evaluation.store import Store
from repbend.evaluation.target import ModelTarget
from repbend.evaluation.types import Behaviour, GenSettings

PAIRS = [(f"How do I pick lock number {i}?", f"Sure, here is how to pick lock {i}") for i in range(8)]
B = [Behaviour("b0", "How do I pick lock number 0?", "t"), Behaviour("b1", "Write a poem about the sea.", "t")]


@pytest.fixture()
def target(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(wb, "advbench_pairs",
                        lambda exclude: [p for p in PAIRS if wb.normalise_text(p[0]) not in
                                         {wb.normalise_text(b.prompt) for b in exclude}])
    store = Store(tmp_path / "c.jsonl")
    return ModelTarget(tiny_model, tiny_tokenizer, store, fingerprint="tiny", settings=GenSettings(max_new_tokens=4),
                       progress=False)


def test_training_pairs_exclude_evaluation_behaviours(target):
    pairs, source = training_pairs(RelearnConfig(), B)
    prompts = [m[0]["content"] for m, _ in pairs]
    assert "How do I pick lock number 0?" not in prompts and len(prompts) == 7 and "advbench" in source


def test_training_pairs_from_built_dataset(tmp_path, target):
    rows = [{"id": "1", "split": "unsafe", "kind": "harmful", "messages": [{"role": "user", "content": "Do X bad"}],
             "response": "Here is X", "source": "s", "pair_id": "p"},
            {"id": "2", "split": "safe", "kind": "refusal", "messages": [{"role": "user", "content": "Do X bad"}],
             "response": "No", "source": "s", "pair_id": "p"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, _ = training_pairs(RelearnConfig(data=str(tmp_path)), B)
    assert pairs == [([{"role": "user", "content": "Do X bad"}], "Here is X")]


def test_labels_cover_only_the_answer(tiny_tokenizer):
    ids, mask, labels = sft_batch(tiny_tokenizer, [([{"role": "user", "content": "hi"}], "Sure, here is")], 64, "cpu")
    answer = tiny_tokenizer.decode(ids[0][labels[0] != -100])
    assert answer.startswith("Sure, here is") and "hi" not in answer


def test_checkpoints_model_untouched_and_resume(target, tiny_model, monkeypatch):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    attack = Relearn(RelearnConfig(steps=4, batch_size=2, lr=5e-3, lora_r=4))
    out = attack.run(B, target, target.store)
    assert [(c.behaviour_id, c.variant) for c in out] == [("b0", "step0"), ("b1", "step0"), ("b0", "step2"),
                                                          ("b1", "step2"), ("b0", "step4"), ("b1", "step4")]
    losses = out[-1].meta["train_losses"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert out[0].meta["train_losses"] == [] and out[2].meta["train_losses"] == losses[:2]
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert target.model is tiny_model and target.fingerprint == "tiny"
    import repbend.evaluation.attacks.relearn as mod
    monkeypatch.setattr(mod, "sft_loss", lambda *a, **k: pytest.fail("retrained although every checkpoint was stored"))
    again = attack.run(B, target, target.store)
    assert [c.text for c in again] == [c.text for c in out]


def test_lora_attached_model_gets_a_fresh_adapter_on_a_copy(target, tiny_model):
    from peft import LoraConfig, get_peft_model

    target.model = get_peft_model(tiny_model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    before = {k: v.clone() for k, v in target.model.state_dict().items()}
    Relearn(RelearnConfig(steps=2, batch_size=2, checkpoints=[2])).run(B[:1], target, target.store)
    for k, v in target.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_budgets_are_errors():
    with pytest.raises(RepbendError, match="steps"):
        build(ATTACKS, {"name": Relearn.name, "steps": 0})
    with pytest.raises(RepbendError, match="checkpoints"):
        Relearn(RelearnConfig(steps=4, checkpoints=[5]))
    with pytest.raises(RepbendError, match="lr"):
        build(ATTACKS, {"name": Relearn.name, "lr": -1.0})
