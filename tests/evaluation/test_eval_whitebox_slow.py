"""White-box attacks on the real default model (slow: minutes on a shared 2-core CPU)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_target(tmp_path_factory):
    from repbend.evaluation.store import Store
    from repbend.evaluation.target import ModelTarget
    from repbend.evaluation.types import GenSettings
    from repbend.models import load_model

    model, tok = load_model("default")
    store = Store(tmp_path_factory.mktemp("wb") / "cache.jsonl")
    return ModelTarget(model, tok, store, fingerprint="default", settings=GenSettings(max_new_tokens=16),
                       progress=False)


@pytest.fixture(scope="module")
def jbb_behaviour():
    from repbend.data.sources import load_jbb
    from repbend.evaluation.types import Behaviour

    r = load_jbb()[39]
    return Behaviour(r["id"], r["prompt"], "jbb", target=r["target"])


def test_embedding_cpu_preset_reaches_the_stop_loss(default_target, jbb_behaviour):
    from repbend.evaluation.attacks.embedding import EmbeddingAttack, EmbeddingConfig

    out = EmbeddingAttack(EmbeddingConfig(preset="cpu")).run([jbb_behaviour], default_target, default_target.store)
    assert out[0].meta["best_loss"] < 0.05 < out[0].meta["losses"][0]
    assert out[0].text.lower().startswith("sure")


def test_gcg_one_step_keeps_a_consistent_suffix(default_target, jbb_behaviour):
    from repbend.data.chat import prompt_ids
    from repbend.evaluation.attacks.gcg import GCGAttack, GCGConfig

    out = GCGAttack(GCGConfig(preset="cpu", steps=1, search_width=16)).run([jbb_behaviour], default_target,
                                                                         default_target.store)
    tok = default_target.tokenizer
    ids = prompt_ids(tok, out[0].messages)
    suffix = out[0].meta["suffix_ids"]
    assert any(ids[i:i + len(suffix)] == suffix for i in range(len(ids)))
    assert out[0].meta["best_loss"] <= out[0].meta["losses"][0] + 1e-9 and out[0].meta["steps"] == 1


def test_steering_moves_the_real_model_and_is_reproducible(default_target, jbb_behaviour, tmp_path):
    """On SmolLM2: the steer at hidden state 15 (where the white-box suite's validation lands) changes the answer,
    leaves the model as it was, and a fresh run with the same seed recomputes the same steer (its answers come from
    the target's generation cache, keyed on the steer)."""
    import torch

    from repbend.evaluation.attacks.steering import Steering, SteeringConfig
    from repbend.evaluation.store import Store
    from repbend.evaluation.types import Conversation

    cfg = SteeringConfig(n_train=8, n_val=2, layers=[15], coefficients=[1.0], val_max_new_tokens=8)
    logits_before = default_target.model(input_ids=torch.tensor([[1, 2, 3]])).logits.detach()
    out = Steering(cfg).run([jbb_behaviour], default_target, default_target.store)
    assert out[0].variant == "layer15_c1" and out[0].meta["gap"] > 1.0
    direct = default_target.generate([Conversation(jbb_behaviour.id, "direct", "",
                                                   [{"role": "user", "content": jbb_behaviour.full_prompt}])],
                                     default_target.settings)[0][0]
    assert out[0].text.strip() and out[0].text != direct
    torch.testing.assert_close(default_target.model(input_ids=torch.tensor([[1, 2, 3]])).logits.detach(), logits_before)
    again = Steering(cfg).run([jbb_behaviour], default_target, Store(tmp_path / "fresh.jsonl"))
    assert again[0].meta["gap"] == pytest.approx(out[0].meta["gap"]) and again[0].variant == out[0].variant
