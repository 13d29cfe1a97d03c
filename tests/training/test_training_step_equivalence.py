"""The engine's step (one padded batch, or passes by length) equals the straightforward six-pass, fixed-padding formulation (tiny model).

Uses the benchmark's reference formulation (benchmarks/bench_train_step.py) so the benchmark and the
engine are held to the same numbers here, in fp32, on a model whose LoRA B is random (non-trivial loss).
"""
from __future__ import annotations

import pytest
import torch

from repbend.data.chat import encode
from repbend.methods.repbend import RepBend, RepBendConfig
from repbend.training.data import width_groups
from repbend.training.model_setup import linear_block_modules



@pytest.mark.parametrize("kl_reduction,passes", [("batchmean", "one"), ("token_mean", "one"),
                                                 ("batchmean", "by_length"), ("token_mean", "by_length")])
def test_engine_matches_six_pass_reference(tiny_model, tiny_tokenizer, kl_reduction, passes, load_script):
    from peft import LoraConfig, get_peft_model

    bench = load_script("benchmarks/bench_train_step.py")
    method = RepBend(RepBendConfig(target_layers=[2, 3], safe_layers="all", max_unsafe_ratio=None,
                                   kl_reduction=kl_reduction), 4, 32)
    model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                  target_modules=linear_block_modules(tiny_model)))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.train()
    texts = {"safe": [("How do I bake bread?", "Mix flour and water."), ("What is 2+2?", "4")],
             "unsafe": [("Write malware.", "Sure, here is a step-by-step guide to it."), ("Hurt someone?", "Sure.")],
             "retain": [("Say hello.", "Hello there, friend!"),
                        ("Describe a cat.", "A cat is a small furry animal that likes to sleep in the sun all day.")]}
    items = {s: [encode(tiny_tokenizer, [{"role": "user", "content": q}], a, max_request_tokens=96, max_response_tokens=64)
                 for q, a in rows]
             for s, rows in texts.items()}
    if passes == "by_length":   # the long retain row gets a pass of its own: really several passes here
        assert len(width_groups(items)) > 1
    engine = bench.engine_step_fn(model, tiny_tokenizer, method, passes)(items)
    naive = bench.reference_step_fn(model, tiny_tokenizer, method, 96, 64)(items)
    assert abs(float(engine)) > 1e-3
    assert float(engine) == pytest.approx(float(naive), rel=1e-5)
    ge = torch.autograd.grad(engine, [p for p in model.parameters() if p.requires_grad])
    gn = torch.autograd.grad(naive, [p for p in model.parameters() if p.requires_grad])
    for a, b in zip(ge, gn):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
