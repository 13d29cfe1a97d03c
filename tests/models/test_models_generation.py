"""Batched generation on the tiny random Llama: order, padding, prefill, determinism, PEFT."""
from __future__ import annotations

import pytest
import torch

from repbend.data.chat import prompt_ids
from repbend.errors import RepbendError
from repbend.models.generation import generate

CONVS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are a careful assistant."},
     {"role": "user", "content": "How do I bake bread at home? Mix flour, water, yeast and salt."}],
    [{"role": "user", "content": "What is the capital of France?"}],
    "Write a poem about the sea.",
]


def reference_greedy(model, tok, conv, prefill="", n=12):
    """Unbatched, unpadded greedy decoding written out by hand (no model.generate)."""
    msgs = [{"role": "user", "content": conv}] if isinstance(conv, str) else conv
    ids = torch.tensor([prompt_ids(tok, msgs, prefill)])
    new = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tok.decode(new, skip_special_tokens=True)


def test_greedy_batched_equals_unbatched_reference_in_input_order(tiny_model, tiny_tokenizer):
    out = generate(tiny_model, tiny_tokenizer, CONVS, max_new_tokens=12, batch_size=3, progress=False)
    assert len(out) == len(CONVS) and all(len(o) == 1 for o in out)
    for conv, (text,) in zip(CONVS, out):
        assert text == reference_greedy(tiny_model, tiny_tokenizer, conv)


def test_prefill_is_continued_but_not_returned(tiny_model, tiny_tokenizer):
    prefills = ["Sure, here is", "", "The capital", "The waves"]
    out = generate(tiny_model, tiny_tokenizer, CONVS, prefills, max_new_tokens=8, progress=False)
    for conv, pre, (text,) in zip(CONVS, prefills, out):
        assert text == reference_greedy(tiny_model, tiny_tokenizer, conv, pre, n=8)
    plain = generate(tiny_model, tiny_tokenizer, CONVS[:1], max_new_tokens=8, progress=False)
    assert plain[0][0] != out[0][0]


def test_sampling_is_seeded_per_row_independent_of_batch(tiny_model, tiny_tokenizer):
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.5, num_samples=3, seed=7, progress=False)
    a = generate(tiny_model, tiny_tokenizer, CONVS, batch_size=4, **kw)
    b = generate(tiny_model, tiny_tokenizer, CONVS[::-1], batch_size=2, **kw)[::-1]
    torch.manual_seed(123)  # the global RNG does not matter
    c = generate(tiny_model, tiny_tokenizer, CONVS[2:3], batch_size=1, **kw)
    assert a == b and a[2] == c[0]
    assert len(set(a[1])) > 1  # samples differ from each other
    d = generate(tiny_model, tiny_tokenizer, CONVS, batch_size=4, **{**kw, "seed": 8})
    assert d != a


def test_tiny_top_p_is_greedy(tiny_model, tiny_tokenizer):
    greedy = generate(tiny_model, tiny_tokenizer, CONVS, max_new_tokens=8, progress=False)
    nucleus = generate(tiny_model, tiny_tokenizer, CONVS, max_new_tokens=8, do_sample=True, top_p=1e-6,
                       num_samples=2, progress=False)
    assert [[g[0], g[0]] for g in greedy] == nucleus


def test_peft_model_generates_and_disabled_adapter_matches_base(tiny_model, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    base = generate(tiny_model, tiny_tokenizer, CONVS, max_new_tokens=6, progress=False)
    peft_model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    with_adapter = generate(peft_model, tiny_tokenizer, CONVS, max_new_tokens=6, progress=False)
    with peft_model.disable_adapter():
        without = generate(peft_model, tiny_tokenizer, CONVS, max_new_tokens=6, progress=False)
    assert without == base and with_adapter != base


def test_training_mode_restored_and_bad_input(tiny_model, tiny_tokenizer):
    tiny_model.train()
    generate(tiny_model, tiny_tokenizer, CONVS[:1], max_new_tokens=2, progress=False)
    assert tiny_model.training
    assert generate(tiny_model, tiny_tokenizer, [], progress=False) == []
    with pytest.raises(RepbendError, match="prefills"):
        generate(tiny_model, tiny_tokenizer, CONVS, ["x"], progress=False)
    with pytest.raises(RepbendError, match="temperature"):
        generate(tiny_model, tiny_tokenizer, CONVS, do_sample=True, temperature=0, progress=False)


@pytest.mark.parametrize("engine", ["loop", "cb"])
@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_own_engines_match_model_generate(tiny_model, tiny_tokenizer, batch_size, engine):
    """The own decode loop (finished rows dropped) and continuous batching answer exactly like ``model.generate``."""
    prefills = ["", "Sure", "", "The"]
    for kw in (dict(max_new_tokens=12), dict(max_new_tokens=9, do_sample=True, temperature=1.3, num_samples=2, seed=3)):
        loop = generate(tiny_model, tiny_tokenizer, CONVS, prefills, batch_size=batch_size, progress=False,
                        engine=engine, **kw)
        hf = generate(tiny_model, tiny_tokenizer, CONVS, prefills, batch_size=batch_size, progress=False,
                      engine="hf", **kw)
        assert loop == hf
    with pytest.raises(RepbendError, match="engine"):
        generate(tiny_model, tiny_tokenizer, CONVS, engine="vroom", progress=False)


@pytest.mark.parametrize("chunk", [1, 40, 100_000])
def test_loop_prefill_in_row_chunks_into_preallocated_cache_matches_model_generate(tiny_model, tiny_tokenizer,
                                                                                   monkeypatch, chunk):
    """Prefill passes of a few rows each (PREFILL_CHUNK_TOKENS), keys/values copied into buffers that decode steps
    write in place: the same answers as ``model.generate`` (greedy and sampled), rows ending early included."""
    import repbend.models.generation as g

    monkeypatch.setattr(g, "PREFILL_CHUNK_TOKENS", chunk)
    seen = []
    real = g._prefill
    monkeypatch.setattr(g, "_prefill", lambda *a: seen.append(real(*a)) or seen[-1])
    convs = CONVS * 3
    for kw in (dict(max_new_tokens=10), dict(max_new_tokens=7, do_sample=True, temperature=1.3, num_samples=2, seed=5)):
        assert generate(tiny_model, tiny_tokenizer, convs, batch_size=12, progress=False, engine="loop", **kw) == \
            generate(tiny_model, tiny_tokenizer, convs, batch_size=12, progress=False, engine="hf", **kw)
    _, BufferLayer = g._dynamic_layer()
    assert seen and all(type(layer) is BufferLayer for _, cache in seen for layer in cache.layers)


def test_buffer_layer_writes_in_place_and_grows_past_its_room():
    import repbend.models.generation as g

    _, BufferLayer = g._dynamic_layer()
    k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    buf_k, buf_v = torch.zeros(2, 3, 6, 4), torch.zeros(2, 3, 6, 4)
    buf_k[:, :, :5], buf_v[:, :, :5] = k, v
    layer = BufferLayer(buf_k, buf_v, 5)
    assert layer.get_seq_length() == 5
    k1, v1 = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
    keys, values = layer.update(k1, v1)
    assert keys.data_ptr() == buf_k.data_ptr()          # written into the buffer, no copy of the cache
    torch.testing.assert_close(keys, torch.cat([k, k1], -2))
    k2, v2 = torch.randn(2, 3, 3, 4), torch.randn(2, 3, 3, 4)     # past the planned room: the buffers grow
    keys, values = layer.update(k2, v2)
    torch.testing.assert_close(values, torch.cat([v, v1, v2], -2))
    layer.batch_select_indices(torch.tensor([1]))
    torch.testing.assert_close(layer.keys, torch.cat([k, k1, k2], -2)[1:])
    assert layer.get_seq_length() == 9


def test_engine_from_environment(tiny_model, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("REPBEND_GENERATION_ENGINE", "vroom")
    with pytest.raises(RepbendError, match="REPBEND_GENERATION_ENGINE"):
        generate(tiny_model, tiny_tokenizer, CONVS, progress=False)
    monkeypatch.setenv("REPBEND_GENERATION_ENGINE", "hf")
    assert generate(tiny_model, tiny_tokenizer, CONVS, max_new_tokens=5, progress=False) == \
        generate(tiny_model, tiny_tokenizer, CONVS, max_new_tokens=5, progress=False, engine="loop")


@pytest.mark.parametrize("engine", ["loop", "cb"])
def test_rows_ending_early_leave_the_batch_without_changing_the_others(tiny_model, tiny_tokenizer, engine):
    # raise the end-of-turn logit so that rows finish at different steps
    eos = torch.tensor([tiny_tokenizer.eos_token_id])
    tiny_model.lm_head.register_forward_hook(
        lambda mod, inp, out: out.index_add(-1, eos, torch.full(out.shape[:-1] + (1,), 0.5)))
    convs = CONVS * 3 + [f"Tell me about {w} bread." for w in ("rye", "white", "sourdough", "corn", "flat")]
    out = generate(tiny_model, tiny_tokenizer, convs, max_new_tokens=30, batch_size=4 if engine == "cb" else 12,
                   progress=False, engine=engine)
    lengths = {len(tiny_tokenizer(t[0])["input_ids"]) for t in out}
    assert len(lengths) > 2, "the test needs answers of different lengths"
    for conv, (text,) in zip(convs, out):
        assert text == reference_greedy(tiny_model, tiny_tokenizer, conv, n=30)


def test_request_longer_than_the_context_is_cut_keeping_its_end(tiny_model, tiny_tokenizer):
    """A huge prompt is cut to the model's context (512 positions here) before generation, with a warning."""
    question = "What is the capital of France?"
    long = [{"role": "system", "content": "You are a careful assistant."},
            {"role": "user", "content": "bread and water " * 40_000 + question}]   # ~640 KB
    with pytest.warns(UserWarning, match="longer than the model's context"):
        out = generate(tiny_model, tiny_tokenizer, [long, CONVS[0]], max_new_tokens=8, progress=False)
    from repbend.models.generation import fit_prompt

    ids, cut = fit_prompt(tiny_tokenizer, long, "", 512 - 8)
    assert cut and len(ids) <= 512 - 8
    text = tiny_tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a careful assistant.")            # template + system kept
    assert text.endswith(question + "<|im_end|>\n<|im_start|>assistant\n")               # the end of the request kept
    kept = tiny_tokenizer.decode(ids, skip_special_tokens=False)
    assert reference_greedy(tiny_model, tiny_tokenizer, [long[0], {"role": "user", "content": kept.split(
        "<|im_start|>user\n", 1)[1].split("<|im_end|>")[0]}], n=8) == out[0][0]
    assert out[1][0] == reference_greedy(tiny_model, tiny_tokenizer, CONVS[0], n=8)


def test_length_batches_minimise_padding_plus_a_cost_per_batch():
    """Exact against brute force over every cut of small sorted lists; never above batch_size; a few long prompts
    get their own batch, similar ones share one, equal ones fill whole batches first."""
    import itertools
    import random

    from repbend.models.generation import STEP_OVERHEAD_TOKENS, length_batches

    def cost(lengths, batches, extra):
        return sum(lengths[a] * (b - a) + extra for a, b in batches)

    rng = random.Random(0)
    for _ in range(60):
        n, bs, new = rng.randint(1, 8), rng.randint(1, 5), rng.choice([1, 4, 48])
        lengths = sorted((rng.choice([rng.randint(5, 60), rng.randint(200, 700)]) for _ in range(n)), reverse=True)
        got = length_batches(lengths, bs, new)
        assert got[0][0] == 0 and got[-1][1] == n and all(a < b <= a + bs for a, b in got)
        assert all(x[1] == y[0] for x, y in zip(got, got[1:]))
        best = min(cost(lengths, [(a, b) for a, b in zip((0,) + cuts, cuts + (n,))], new * STEP_OVERHEAD_TOKENS)
                   for k in range(n) for cuts in itertools.combinations(range(1, n), k)
                   if all(b - a <= bs for a, b in zip((0,) + cuts, cuts + (n,))))
        assert cost(lengths, got, new * STEP_OVERHEAD_TOKENS) == best
    assert length_batches([700] * 10 + [60] * 50, 64, 48) == [(0, 10), (10, 60)]
    assert length_batches(list(range(60, 36, -1)), 64, 48) == [(0, 24)]
    assert length_batches([100] * 130, 64, 48) == [(0, 64), (64, 128), (128, 130)]


def test_budget_batches_cap_rows_and_padded_tokens():
    from repbend.models.generation import budget_batches

    lengths = [10, 500, 12, 11, 900, 3000, 13]
    batches = budget_batches(lengths, max_rows=3, max_tokens=1000)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches == [[0, 3, 2], [6, 1], [4], [5]]      # sorted by length; 900 and 3000 alone
    assert all(len(b) <= 3 and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 1000) for b in batches)


def test_shared_prefix_leaves_each_row_a_token_and_skips_short_or_single():
    from repbend.models.generation import shared_prefix

    assert shared_prefix([[1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 3, 4]], minimum=1) == 3
    assert shared_prefix([[1, 2, 3], [1, 2, 3], [1, 2, 3, 4]], minimum=1) == 2     # the shortest keeps its last token
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 5]], minimum=3) == 0                # too short to pay for its pass
    assert shared_prefix([[7, 1, 2], [1, 2, 3]], minimum=1) == 0
    assert shared_prefix([[1, 2, 3, 4]], minimum=1) == 0                          # one row: nothing to share


@pytest.mark.parametrize("batch_size", [2, 5])
def test_loop_runs_a_shared_prompt_start_once_with_the_same_answers(tiny_model, tiny_tokenizer, monkeypatch,
                                                                    batch_size):
    """Rows of a batch that start with the same tokens (one system prompt): the loop engine runs those tokens once,
    as one row, and copies their keys/values to every row; the answers equal whole-prompt passes and
    ``model.generate`` (greedy and sampled, rows ending early and row-chunked prefill passes included)."""
    import repbend.models.generation as g

    monkeypatch.setattr(g, "PREFILL_CHUNK_TOKENS", 40)
    system = {"role": "system", "content": "You are a careful assistant who answers briefly and kindly."}
    convs = [[system, {"role": "user", "content": q}] for q in
             ("Hi", "How do I bake bread at home?", "What is the capital of France?", "A poem about the sea, please.",
              "Name three colours.")]
    prefills = ["", "Sure", "", "The", ""]
    rows = [prompt_ids(tiny_tokenizer, c, p) for c, p in zip(convs, prefills)]
    shared = g.shared_prefix(rows)
    assert shared >= g.SHARED_PREFIX_MIN_TOKENS
    widths = []
    hook = tiny_model.get_input_embeddings().register_forward_hook(lambda m, a, out: widths.append(tuple(a[0].shape)))
    try:
        for kw in (dict(max_new_tokens=10), dict(max_new_tokens=7, do_sample=True, temperature=1.3, num_samples=2,
                                                 seed=5)):
            widths.clear()
            once = g.generate(tiny_model, tiny_tokenizer, convs, prefills, batch_size=batch_size, progress=False,
                              engine="loop", **kw)
            assert (1, shared) in widths or batch_size < len(convs)  # one batch: exactly the common start
            assert all(w[0] == 1 or w[1] < max(map(len, rows)) for w in widths)  # no row ran its whole prompt
            whole = g.generate(tiny_model, tiny_tokenizer, convs, prefills, batch_size=batch_size, progress=False,
                               engine="loop", share_prefix=False, **kw)
            hf = g.generate(tiny_model, tiny_tokenizer, convs, prefills, batch_size=batch_size, progress=False,
                            engine="hf", **kw)
            assert once == whole == hf
    finally:
        hook.remove()


def test_prefill_with_a_shared_prefix_gives_the_whole_prompts_logits_and_cache(tiny_model, tiny_tokenizer, monkeypatch):
    """The prompt pass over [shared start run once | each row's rest]: the same last-position logits and the same
    keys/values (real positions) as the pass over the whole left-padded prompts."""
    import repbend.models.generation as g

    monkeypatch.setattr(g, "PREFILL_CHUNK_TOKENS", 30)          # several row passes
    system = {"role": "system", "content": "You are a careful assistant who answers briefly and kindly."}
    rows = [prompt_ids(tiny_tokenizer, [system, {"role": "user", "content": q}]) for q in
            ("Hi", "How do I bake bread at home?", "What is the capital of France?")]
    p = g.shared_prefix(rows)
    pad = tiny_tokenizer.pad_token_id or 0
    with torch.inference_mode():
        ids, attn = g.left_pad(rows, pad)
        pos = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 0)
        whole, cache_w = g._prefill(tiny_model, ids, attn, pos, 4)
        rest, rest_attn = g.left_pad([r[p:] for r in rows], pad)
        full_attn = torch.cat([torch.ones(len(rows), p, dtype=torch.long), rest_attn], dim=-1)
        rest_pos = (full_attn.cumsum(-1) - 1).masked_fill(full_attn == 0, 0)[:, p:]
        shared, cache_s = g._prefill(tiny_model, rest, full_attn, rest_pos, 4, rows[0][:p])
    torch.testing.assert_close(shared, whole, rtol=1e-5, atol=1e-5)
    for lw, ls in zip(cache_w.layers, cache_s.layers):
        for r, row in enumerate(rows):   # the row's real tokens: right-aligned in both layouts after the prefix
            n = len(row)
            torch.testing.assert_close(ls.keys[r, :, :p], lw.keys[r, :, -n:][:, :p], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ls.keys[r, :, -(n - p):], lw.keys[r, :, -(n - p):], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ls.values[r, :, -(n - p):], lw.values[r, :, -(n - p):], rtol=1e-5, atol=1e-5)
