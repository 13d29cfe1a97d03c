"""load_model / resolve_model on tiny saved models: folders, adapters, devices, dtypes, bad input, CLI."""
from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from cli_helpers import exit_code
from repbend.errors import RepbendError
from repbend.models import list_aliases, load_model, resolve_model
from repbend.models import loading


def make_adapter(base, folder, *, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pm.save_pretrained(folder)
    return pm


def test_aliases_resolve_without_converting():
    assert {"default", "smollm2-135m-instruct"} <= set(list_aliases())
    res = resolve_model("default")
    assert res.kind == "alias" and res.alias == "smollm2-135m-instruct"
    assert res.status == "not converted" and res.location.endswith("models/smollm2-135m-instruct")
    assert resolve_model("SmolLM2-135M-Instruct").alias == "smollm2-135m-instruct"


@pytest.mark.parametrize("spec,match", [
    ("./no/such/model", "does not exist.*Aliases: default"),
    ("/tmp/definitely-missing-repbend-model", "does not exist"),
    ("defualt", "Did you mean 'default'"),
    ("smollm2", "Did you mean 'smollm2-135m'"),
    ("qwen-coder-1.5b", "Did you mean 'qwen2.5-coder-1.5b'"),
    ("", "alias, a folder or a hub id"),
])
def test_bad_specs_give_one_line_errors(spec, match):
    with pytest.raises(RepbendError, match=match) as e:
        resolve_model(spec)
    assert "\n" not in str(e.value)


def test_hub_ids_resolve_to_hub_and_fail_clearly_offline(monkeypatch):
    from huggingface_hub import constants

    assert resolve_model("meta-llama/Meta-Llama-3-8B-Instruct").kind == "hub"
    assert resolve_model("gpt2").kind == "hub"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RepbendError, match="hub.*HF_HUB_OFFLINE.*alias"):
        load_model("repbend-test/no-such-model")


def test_folder_without_config(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(RepbendError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_load_folder_defaults_and_overrides(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir))
    assert resolve_model(str(tiny_model_dir)).kind == "folder"
    p = next(model.parameters())
    assert p.dtype == torch.float32 and p.device.type == "cpu" and not p.requires_grad and not model.training
    assert tok.pad_token == "<pad>" and tok.chat_template
    model16, _ = load_model(str(tiny_model_dir), dtype="bf16", for_training=True)
    p = next(model16.parameters())
    assert p.dtype == torch.bfloat16 and p.requires_grad
    with pytest.raises(RepbendError, match="Unknown dtype"):
        load_model(str(tiny_model_dir), dtype="int3")
    with pytest.raises(RepbendError, match="Unknown device"):
        load_model(str(tiny_model_dir), device="gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(RepbendError, match="CUDA is not available"):
            load_model(str(tiny_model_dir), device="cuda")


def test_tokenizer_without_pad_token_gets_eos_and_says_so(tmp_path, capsys):
    tok = build_tiny_tokenizer()
    tok.pad_token = None
    build_tiny_model(build_tiny_tokenizer()).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loading._WARNED.clear()
    model, loaded = load_model(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    assert "no pad token" in capsys.readouterr().err


def test_fallback_template_is_opt_in(tmp_path):
    from repbend.data.chat import FALLBACK_TEMPLATE, encode

    tok = build_tiny_tokenizer(chat_template=None)
    build_tiny_model(tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    _, plain = load_model(str(tmp_path))
    with pytest.raises(RepbendError, match="no chat template"):
        encode(plain, [{"role": "user", "content": "hi"}], "hello")
    _, fb = load_model(str(tmp_path), fallback_template=True)
    assert fb.chat_template == FALLBACK_TEMPLATE


def test_adapter_roundtrip_and_adapter_only_spec(tiny_model_dir, tmp_path):
    from peft import PeftModel

    base, tok = load_model(str(tiny_model_dir), for_training=True)
    pm = make_adapter(base, tmp_path / "adapter")
    ids = tok("How do I bake bread?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    for model, _ in (load_model(str(tiny_model_dir), adapter=str(tmp_path / "adapter")),
                     load_model(str(tmp_path / "adapter"))):  # base read from adapter_config.json
        assert isinstance(model, PeftModel)
        with torch.no_grad():
            assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-6)
    assert resolve_model(str(tmp_path / "adapter")).kind == "adapter"


@pytest.mark.parametrize("hidden,layers,match", [(48, 4, "inputs|outputs"), (32, 6, "does not exist")])
def test_adapter_base_mismatch_is_a_clear_error(tiny_model_dir, tmp_path, hidden, layers, match):
    other = build_tiny_model(build_tiny_tokenizer(), num_layers=layers, hidden=hidden)
    make_adapter(other, tmp_path / "bad")
    with pytest.raises(RepbendError, match=f"does not fit.*({match})"):
        load_model(str(tiny_model_dir), adapter=str(tmp_path / "bad"))


def test_adapter_folder_problems(tiny_model_dir, tmp_path):
    with pytest.raises(RepbendError, match="no adapter_config.json"):
        load_model(str(tiny_model_dir), adapter=str(tmp_path))
    (tmp_path / "adapter_config.json").write_text('{"base_model_name_or_path": "x", "peft_type": "LORA"}')
    with pytest.raises(RepbendError, match="no adapter weights"):
        load_model(str(tiny_model_dir), adapter=str(tmp_path))



def test_cli_models_chat_and_user_errors(tiny_model_dir, capsys):
    assert exit_code(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct  [not converted]  aliases: default" in out
    assert exit_code(["chat", "--model", str(tiny_model_dir), "-n", "4", "--system", "Be brief.", "Hi"]) == 0
    assert "generated in" in capsys.readouterr().err
    for argv in (["models", "./missing-folder"], ["chat", "--model", "defualt", "hi"]):
        assert exit_code(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
