"""Input-embedding attack on the tiny model: loss goes down, only soft tokens get gradients, resume, errors."""
from __future__ import annotations

import pytest
import torch

from repbend.errors import RepbendError
from repbend.evaluation.attacks import ATTACKS
from repbend.evaluation.suites import build
from repbend.evaluation.attacks import ATTACKS
from repbend.evaluation.attacks import whitebox_common as wb
from repbend.evaluation.attacks.embedding import EmbeddingAttack, EmbeddingConfig, optimise, target_losses, unpack
from repbend.evaluation.store import Store
from repbend.evaluation.target import ModelTarget
from repbend.evaluation.types import Behaviour, GenSettings

BEHAVIOURS = [Behaviour("b0", "How do I bake bread at home?", "t", target="Sure, here is how to bake bread"),
              Behaviour("b1", "Write a poem about the sea.", "t", target="Sure, here is a poem")]


def make_target(model, tok, tmp_path):
    store = Store(tmp_path / "cache.jsonl")
    return ModelTarget(model, tok, store, fingerprint="tiny", settings=GenSettings(max_new_tokens=5), progress=False), store


def test_registered():
    assert ATTACKS.get("embedding") is EmbeddingAttack


def test_optimisation_lowers_target_loss_and_batch_rows_are_independent(tiny_model, tiny_tokenizer):
    slots = [wb.prompt_slots(tiny_tokenizer, b.prompt, b.target) for b in BEHAVIOURS]
    cfg = EmbeddingConfig(preset="cpu", steps=15).resolved()
    soft, best, hist = optimise(tiny_model, tiny_tokenizer, slots, [b.target for b in BEHAVIOURS], cfg, wb.Cost())
    for h, b in zip(hist, best):
        assert b < h[0] - 0.05, h
    emb = tiny_model.get_input_embeddings()
    with torch.no_grad():
        both = target_losses(tiny_model, emb, slots, soft)
        alone = target_losses(tiny_model, emb, slots[1:], soft[1:])
    torch.testing.assert_close(both[1:], alone, atol=1e-4, rtol=1e-4)    # padding does not leak across rows
    torch.testing.assert_close(both, best, atol=1e-4, rtol=1e-4)         # the returned soft tokens have best loss


def test_target_losses_match_a_direct_unpadded_computation(tiny_model, tiny_tokenizer):
    """Left padding + LM head on the target positions only == one plain forward per row, full logits."""
    import torch.nn.functional as F

    behaviours = BEHAVIOURS + [Behaviour("b2", "Hi", "t", target="Sure")]      # different prompt/target lengths
    slots = [wb.prompt_slots(tiny_tokenizer, b.prompt, b.target) for b in behaviours]
    emb = tiny_model.get_input_embeddings()
    torch.manual_seed(0)
    soft = torch.randn(len(slots), 5, emb.weight.shape[1]) * 0.02
    with torch.no_grad():
        batched = target_losses(tiny_model, emb, slots, soft)
        for i, s in enumerate(slots):
            ids = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
            row = torch.cat([emb(ids(s.before)), soft[i], emb(ids(s.after + s.target))]).unsqueeze(0)
            logits = tiny_model(inputs_embeds=row).logits[0].float()
            n_t = len(s.target)
            direct = F.cross_entropy(logits[-n_t - 1:-1], ids(s.target))
            torch.testing.assert_close(batched[i], direct, atol=1e-4, rtol=1e-4)


def test_cached_prefix_gives_the_full_sequence_loss_and_gradient(tiny_model, tiny_tokenizer):
    """A step runs only [soft, after, target] over the cached prompt beginnings; a subset of rows selects from
    the same cache: the losses and the soft tokens' gradients equal one plain forward/backward per row."""
    import torch.nn.functional as F

    from repbend.evaluation.attacks.embedding import Prefix

    behaviours = BEHAVIOURS + [Behaviour("b2", "Hi", "t", target="Sure")]
    slots = [wb.prompt_slots(tiny_tokenizer, b.prompt, b.target) for b in behaviours]
    emb = tiny_model.get_input_embeddings()
    torch.manual_seed(0)
    soft = (torch.randn(len(slots), 5, emb.weight.shape[1]) * 0.02).requires_grad_(True)
    with wb.frozen(tiny_model):
        prefix = Prefix(tiny_model, slots)
        rows = [0, 2]
        losses = target_losses(tiny_model, emb, [slots[i] for i in rows], soft[rows], prefix, rows)
        grad, = torch.autograd.grad(losses.sum(), soft)
        for j, i in enumerate(rows):
            s = slots[i]
            ids = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
            row = torch.cat([emb(ids(s.before)), soft[i], emb(ids(s.after + s.target))]).unsqueeze(0)
            logits = tiny_model(inputs_embeds=row).logits[0].float()
            direct = F.cross_entropy(logits[-len(s.target) - 1:-1], ids(s.target))
            torch.testing.assert_close(losses[j], direct, atol=1e-5, rtol=1e-5)
            g, = torch.autograd.grad(direct, soft)
            torch.testing.assert_close(grad[i], g[i], atol=1e-5, rtol=1e-4)
        assert grad[1].abs().sum() == 0                      # a row outside the subset gets no gradient


def test_only_soft_tokens_change_and_grad_flags_restored(tiny_model, tiny_tokenizer, tmp_path):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    flags = [p.requires_grad for p in tiny_model.parameters()]
    target, store = make_target(tiny_model, tiny_tokenizer, tmp_path)
    EmbeddingAttack(EmbeddingConfig(preset="cpu", steps=3)).run(BEHAVIOURS[:1], target, store)
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [p.requires_grad for p in tiny_model.parameters()] == flags


def test_works_with_lora_adapter_attached(tiny_model, tiny_tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    lora = {n: p.clone() for n, p in model.named_parameters() if "lora_" in n}
    target, store = make_target(model, tiny_tokenizer, tmp_path)
    out = EmbeddingAttack(EmbeddingConfig(preset="strong", steps=6, samples=2)).run(BEHAVIOURS, target, store)
    assert [(c.behaviour_id, c.sample) for c in out] == [("b0", 0), ("b0", 1), ("b1", 0), ("b1", 1)]
    assert out[0].meta["best_loss"] < out[0].meta["losses"][0]
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert p.requires_grad and torch.equal(p, lora[n])


def test_resume_skips_finished_behaviours(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    import repbend.evaluation.attacks.embedding as mod

    target, store = make_target(tiny_model, tiny_tokenizer, tmp_path)
    attack = EmbeddingAttack(EmbeddingConfig(preset="cpu", steps=2, batch_size=1))
    first = attack.run(BEHAVIOURS[:1], target, store)
    rec = store.get(attack._key(target, BEHAVIOURS[0]))
    assert unpack(rec["soft_fp16_b64"], tuple(rec["soft_shape"])).shape == (20, tiny_model.config.hidden_size)
    seen = []
    real = mod.optimise
    monkeypatch.setattr(mod, "optimise", lambda m, t, slots, *a, **k: seen.append(len(slots)) or real(m, t, slots, *a, **k))
    again = attack.run(BEHAVIOURS, target, store)
    assert seen == [1]                        # only the second behaviour was optimised
    assert again[0].text == first[0].text and again[0].meta["losses"] == first[0].meta["losses"]


@pytest.mark.parametrize("field", ["steps", "samples", "num_tokens", "lr", "batch_size", "time_limit_s"])
def test_non_positive_budget_is_an_error(field):
    with pytest.raises(RepbendError, match=field):
        build(ATTACKS, {"name": EmbeddingAttack.name, field: 0})


def test_missing_target_is_an_error_naming_the_attack(tiny_model, tiny_tokenizer, tmp_path):
    target, store = make_target(tiny_model, tiny_tokenizer, tmp_path)
    with pytest.raises(RepbendError, match="'embedding'.*target"):
        EmbeddingAttack(EmbeddingConfig(preset="cpu")).run([Behaviour("x", "hi", "t")], target, store)


def test_model_without_input_embeddings_is_an_error(tiny_tokenizer, tmp_path):
    class NoEmb(torch.nn.Module):
        def get_input_embeddings(self):
            return None

    target, store = make_target(NoEmb(), tiny_tokenizer, tmp_path)
    with pytest.raises(RepbendError, match="input embeddings"):
        EmbeddingAttack(EmbeddingConfig(preset="cpu")).run(BEHAVIOURS, target, store)
