"""ModelTarget: real batched generation on a tiny model, cached on disk, resumable."""
import pytest

from repbend.evaluation.store import Store
from repbend.evaluation.target import ModelTarget, fingerprint_model
from repbend.evaluation.types import Conversation, GenSettings
from repbend.models.generation import generate


class CountingGenerate:
    """The real generator, counting calls and generated sequences."""

    def __init__(self):
        self.calls, self.sequences = 0, 0

    def __call__(self, model, tokenizer, conversations, prefills=None, **kw):
        self.calls += 1
        self.sequences += len(conversations) * (kw["num_samples"] if kw["do_sample"] else 1)
        return generate(model, tokenizer, conversations, prefills, **kw)


def _convs(n, attack="direct"):
    return [Conversation(f"b{i}", attack, "", [{"role": "user", "content": f"Write a poem about the sea {i}"}])
            for i in range(n)]


def _target(model, tok, path, gen, **kw):
    return ModelTarget(model, tok, Store(path), batch_size=2, fingerprint="fp", generate_fn=gen,
                       settings=GenSettings(max_new_tokens=4), progress=False, **kw)


def test_generates_once_then_serves_from_cache(tiny_model, tiny_tokenizer, tmp_path):
    gen = CountingGenerate()
    t = _target(tiny_model, tiny_tokenizer, tmp_path / "c.jsonl", gen)
    convs = _convs(5)
    first = t.generate(convs)
    assert gen.calls == 3 and gen.sequences == 5            # batches of 2
    assert [len(x) for x in first] == [1] * 5
    assert t.generate(convs) == first and gen.calls == 3    # nothing regenerated
    # a fresh process (new Store on the same file) also regenerates nothing
    t2 = _target(tiny_model, tiny_tokenizer, tmp_path / "c.jsonl", gen)
    assert t2.generate(convs) == first and gen.calls == 3
    assert t2.stats["cached"] == 5 and t2.stats["generated"] == 0


def test_resume_after_interruption_generates_only_the_rest(tiny_model, tiny_tokenizer, tmp_path):
    gen = CountingGenerate()

    class Boom(Exception):
        pass

    def dying(*a, **kw):
        if gen.calls == 2:
            raise Boom
        return gen(*a, **kw)

    t = _target(tiny_model, tiny_tokenizer, tmp_path / "c.jsonl", dying)
    with pytest.raises(Boom):
        t.generate(_convs(6))
    assert gen.sequences == 4                                  # two batches were stored
    t2 = _target(tiny_model, tiny_tokenizer, tmp_path / "c.jsonl", gen)
    out = t2.generate(_convs(6))
    assert gen.sequences == 6 and len(out) == 6 and t2.stats["cached"] == 4


def test_identical_requests_in_one_call_generate_once(tiny_model, tiny_tokenizer, tmp_path):
    gen = CountingGenerate()
    t = _target(tiny_model, tiny_tokenizer, tmp_path / "c.jsonl", gen)
    convs = _convs(2) + _convs(2)
    out = t.generate(convs)
    assert gen.sequences == 2 and out[0] == out[2] and out[1] == out[3]


def test_sampling_settings_and_prefill_are_separate_cache_entries(tiny_model, tiny_tokenizer, tmp_path):
    gen = CountingGenerate()
    t = _target(tiny_model, tiny_tokenizer, tmp_path / "c.jsonl", gen)
    c = _convs(1)
    t.generate(c)
    sampled = GenSettings(max_new_tokens=4, do_sample=True, num_samples=3, seed=1)
    out = t.generate(c, sampled)
    assert len(out[0]) == 3 and gen.sequences == 1 + 3
    pre = [Conversation("b0", "direct", "", c[0].messages, prefill="Sure, here")]
    t.generate(pre)
    assert gen.sequences == 5
    assert t.throughput()["tokens_per_s"] is not None


def test_fingerprint_changes_with_weights(tiny_model, tiny_tokenizer):
    import torch

    a = fingerprint_model(tiny_model, "m")
    assert a == fingerprint_model(tiny_model, "m") and a != fingerprint_model(tiny_model, "other")
    with torch.no_grad():
        next(tiny_model.parameters()).view(-1)[0] += 1.0
    assert fingerprint_model(tiny_model, "m") != a


def test_group_hands_several_batches_to_one_call_with_the_same_answers(tiny_model, tiny_tokenizer, tmp_path):
    one, grouped = CountingGenerate(), CountingGenerate()
    a = _target(tiny_model, tiny_tokenizer, tmp_path / "a.jsonl", one).generate(_convs(5))
    b = _target(tiny_model, tiny_tokenizer, tmp_path / "b.jsonl", grouped, group=2).generate(_convs(5))
    assert (one.calls, grouped.calls) == (3, 2) and grouped.sequences == 5      # 2 batches of 2 per call, then 1
    assert a == b


def test_a_long_call_stores_each_batch_as_it_ends(tiny_model, tiny_tokenizer, tmp_path):
    """One generator call for everything (group large): an interruption after its second batch keeps both
    batches, and the rerun generates only the rest."""
    gen = CountingGenerate()

    class Boom(Exception):
        pass

    def dying(*a, on_batch, **kw):
        seen = []

        def report(idx, texts):
            on_batch(idx, texts)
            seen.append(idx)
            if len(seen) == 2:
                raise Boom
        return gen(*a, on_batch=report, **kw)

    t = _target(tiny_model, tiny_tokenizer, tmp_path / "c.jsonl", dying)
    with pytest.raises(Boom):
        t.generate(_convs(6), group=100)
    assert gen.calls == 1
    t2 = _target(tiny_model, tiny_tokenizer, tmp_path / "c.jsonl", gen)
    out = t2.generate(_convs(6), group=100)
    assert len(out) == 6 and t2.stats["cached"] == 4 and t2.stats["generated"] == 2 and gen.calls == 2
    fresh = _target(tiny_model, tiny_tokenizer, tmp_path / "d.jsonl", CountingGenerate()).generate(_convs(6))
    assert out == fresh
