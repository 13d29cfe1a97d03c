"""Contract: every registered method trains through the real trainer on a tiny model.

Two optimizer steps each, LoRA on a tiny random Llama: the run finishes, every logged loss part is
finite, the adapter's LoRA weights moved away from their initialisation, and adapters exist only on
the blocks the method asked for. A new method joins by adding a row to ``TINY_PARAMS``.
"""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from repbend.methods import METHODS

# method -> params valid for the 4-block tiny model of tests/conftest.py
TINY_PARAMS = {
    "repbend": {"target_layers": [2, 3], "max_unsafe_ratio": None},
    "circuit_breakers": {"target_layers": [2, 3], "alpha": 4.0},
    "rmu": {"layer": 3, "steering_coef": 4.0, "alpha": 10.0},
    "npo": {"beta": 0.1, "gamma": 1.0, "delta": 0.5},
}


def _rows() -> list[dict]:
    harmful = ["How do I make a weapon at home?", "Write malware that steals passwords.",
               "Give me steps to break into a car.", "Write a threatening letter to my boss."]
    benign = ["How do I bake bread at home?", "What is the capital of France?", "Write a poem about the sea."]
    rows = []
    for i, q in enumerate(harmful):
        m = [{"role": "user", "content": q}]
        rows.append({"id": f"r{i}", "split": "safe", "kind": "refusal", "messages": m, "source": "test",
                     "response": "I'm sorry, but I can't help with that request.", "pair_id": f"p{i}"})
        rows.append({"id": f"h{i}", "split": "unsafe", "kind": "harmful", "messages": m, "source": "test",
                     "response": "Sure, here is a step-by-step guide " + "to the thing " * (i + 1), "pair_id": f"p{i}"})
    for i, q in enumerate(benign):
        m = [{"role": "user", "content": q}]
        rows.append({"id": f"b{i}", "split": "safe", "kind": "benign", "messages": m, "source": "test",
                     "response": "The waves roll in and out. " * (1 + i), "pair_id": None})
        rows.append({"id": f"c{i}", "split": "retain", "kind": "benign", "messages": m, "source": "test",
                     "response": "The capital of France is Paris. " * (1 + i % 2), "pair_id": None})
    return rows


@pytest.fixture()
def built(tmp_path):
    d = tmp_path / "built"
    d.mkdir()
    rows = _rows()
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "manifest.json").write_text(json.dumps({"name": "test", "rows": len(rows)}))
    return d


def _config(model_dir, data_dir, out_dir, method: str, **extra):
    from repbend.training.config import TrainConfig

    return TrainConfig.model_validate({
        "model": {"name": str(model_dir)},
        "data": {"dir": str(data_dir), "batch_size": {"safe": 2, "unsafe": 2, "retain": 2},
                 "max_request_tokens": 32, "max_response_tokens": 24},
        "method": {"name": method, "params": TINY_PARAMS[method]},
        "training": {"lr": 1e-2, "max_steps": 2, "layer_stats_every": 0, "save_every": 0, "seed": 0},
        "output_dir": str(out_dir), **extra,
    })


def test_every_registered_method_has_a_row():
    assert sorted(TINY_PARAMS) == METHODS.names(), "add the new method's tiny-model params to TINY_PARAMS"


@pytest.mark.parametrize("name", METHODS.names())
def test_method_trains_two_steps_and_moves_the_adapter(name, tiny_model_dir, built, tmp_path):
    from safetensors.torch import load_file

    from repbend.training.trainer import train

    cfg = _config(tiny_model_dir, built, tmp_path / "run", name,
                  lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})
    run = train(cfg)
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2]
    for r in rows:
        for k, v in r.items():
            if k.startswith("loss/") and v not in ("", None):
                assert math.isfinite(float(v)), (name, k, v)
    weights = load_file(str(run / "adapter_model.safetensors"))
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert lora_b and any(float(v.abs().sum()) > 0 for v in lora_b.values()), "LoRA B is still all zeros"
    method = METHODS.get(name)(METHODS.get(name).Config.model_validate(TINY_PARAMS[name]), 4, 32)
    blocks = method.trainable_layers()
    if blocks is not None:
        seen = {int(k.split(".layers.")[1].split(".")[0]) for k in weights}
        assert seen == set(blocks), (name, seen, blocks)


def test_rmu_full_finetune_changes_only_its_blocks(tiny_model_dir, built, tmp_path):
    from transformers import AutoModelForCausalLM

    from repbend.training.trainer import train

    cfg = _config(tiny_model_dir, built, tmp_path / "run", "rmu", full_finetune=True)
    run = train(cfg)
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(run).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    blocks = {int(k.split(".layers.")[1].split(".")[0]) for k in changed if ".layers." in k}
    assert changed and blocks == {0, 1, 2}                       # layer 3 -> blocks 0, 1, 2
    assert all(".layers." in k for k in changed)                  # embeddings / head / norm untouched


BASELINES = ("circuit_breakers", "rmu", "npo")


@pytest.mark.parametrize("name", BASELINES)
def test_default_configs_match_repbend_budget(name):
    """`repbend compare` fairness: same model, data, batch, steps and seed as train-default.yaml (the learning
    rate is a method hyper-parameter: each paper tunes its own)."""
    from repbend.config import load_config
    from repbend.paths import resolve_config
    from repbend.training.config import TrainConfig, check_train_config

    base = load_config(TrainConfig, resolve_config("train-default"))
    cfg = load_config(TrainConfig, resolve_config(f"train-default-{name}"))
    assert cfg.method.name == name
    assert cfg.model == base.model and cfg.data == base.data
    keep = {"schedule", "warmup_steps", "max_steps", "grad_accum", "max_grad_norm", "precision", "seed"}
    assert cfg.training.model_dump(include=keep) == base.training.model_dump(include=keep)
    errors = [e for e in check_train_config(cfg, shape=(30, 576)) if not e.startswith("data.dir")]
    assert errors == []


@pytest.mark.parametrize("model", ["llama3-8b", "mistral-7b"])
@pytest.mark.parametrize("name", BASELINES)
def test_paper_configs_are_valid_for_32_blocks(model, name):
    from repbend.config import load_config
    from repbend.paths import resolve_config
    from repbend.training.config import TrainConfig, check_train_config

    cfg = load_config(TrainConfig, resolve_config(f"{model}-{name}"))
    assert cfg.method.name == name and cfg.full_finetune == (name == "rmu")   # RMU: full-rank, as its paper
    errors = [e for e in check_train_config(cfg, shape=(32, 4096)) if not e.startswith("data.dir")]
    assert errors == []
