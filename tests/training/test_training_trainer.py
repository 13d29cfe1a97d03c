"""The training loop on a tiny random Llama: LoRA/full FT, resume equality, divergence, bad input, merge."""
from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import repbend.training.trainer as trainer_mod
from repbend.config import apply_overrides
from repbend.errors import ConfigError, DivergenceError, RepbendError
from repbend.methods import METHODS
from repbend.training import train
from repbend.training.config import TrainConfig
from train_fixtures import built_dir, make_rows, tiny_train_config, write_built  # noqa: F401 (fixture)


def _metrics(run):
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_lora_trains_adapter_only_and_saves_loadable_folder(tiny_model_dir, built_dir, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    captured = {}
    real = trainer_mod._save_final

    def spy(acc, model, unwrapped, tokenizer, run_dir):
        captured["model"] = unwrapped
        real(acc, model, unwrapped, tokenizer, run_dir)

    monkeypatch.setattr(trainer_mod, "_save_final", spy)
    base_before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    run = train(tiny_train_config(tiny_model_dir, built_dir, tmp_path / "run", max_steps=3))
    trained = captured["model"]
    lora_b = {n: p for n, p in trained.named_parameters() if "lora_B" in n}
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b.values())  # LoRA B starts at 0: it moved
    for name, p in trained.get_base_model().named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(p.detach(), base_before[key]), name
    # adapters only on blocks 0..max(target)=0..3 (all 4 blocks of the tiny model) and loadable by peft
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, run)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert not torch.allclose(loaded(ids).logits, AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits)
    rows = _metrics(run)
    assert len(rows) == 3 and {"loss/total", "loss/safe", "loss/unsafe", "loss/cos", "loss/kl"} <= set(rows[0])
    assert (run / "loss.png").stat().st_size > 1000 and (run / "layers.csv").is_file()
    info = json.loads((run / "run_info.json").read_text())
    assert info["status"] == "finished" and info["steps"] == 3 and (run / "config.yaml").is_file()
    assert info["threads"] == torch.get_num_threads()     # results reproduce bit for bit only at the same count
    assert info["precision"] == "fp32"                     # the precision the run used, recorded
    assert (run / "tokenizer_config.json").is_file()


def test_merge_gives_plain_model_with_same_logits(tiny_model_dir, built_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from repbend.training import merge

    run = train(tiny_train_config(tiny_model_dir, built_dir, tmp_path / "run", max_steps=2, layer_stats_every=0))
    out = merge(run, tmp_path / "merged")
    import repbend.training

    assert repbend.training.merge is merge   # the function; its module once shadowed it after the first call
    merged = AutoModelForCausalLM.from_pretrained(out)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft(ids).logits, atol=1e-5)


def test_gguf_converted_folder_can_be_merged_and_fully_finetuned(tiny_model_dir, built_dir, tmp_path):
    """A GGUF -> safetensors folder (plain tensors, config.json still naming GGUF, as the default model's
    conversion used to write it) loaded as GGUF-quantised and refused save_pretrained."""
    converted = tmp_path / "converted"
    shutil.copytree(tiny_model_dir, converted)
    cfg = json.loads((converted / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gguf", "gguf_file": "model.gguf", "dequantize": False}
    (converted / "config.json").write_text(json.dumps(cfg))
    from repbend.training import merge

    run = train(tiny_train_config(converted, built_dir, tmp_path / "lora", max_steps=1, layer_stats_every=0))
    out = merge(run, tmp_path / "merged")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    data = tiny_train_config(converted, built_dir, tmp_path / "full", max_steps=1, layer_stats_every=0).model_dump()
    del data["lora"]
    full = train(TrainConfig.model_validate({**data, "full_finetune": True}))
    assert (full / "model.safetensors").is_file()


class _Stop(Exception):
    pass


def test_resume_ends_with_same_weights(tiny_model_dir, built_dir, tmp_path, monkeypatch):
    kw = dict(max_steps=5, save_every=2, layer_stats_every=0)
    full = train(tiny_train_config(tiny_model_dir, built_dir, tmp_path / "full", **kw))
    real = trainer_mod.save_checkpoint

    def crash_after_save(*a, **k):
        real(*a, **k)
        raise _Stop()

    monkeypatch.setattr(trainer_mod, "save_checkpoint", crash_after_save)
    cfg = tiny_train_config(tiny_model_dir, built_dir, tmp_path / "resumed", **kw)
    with pytest.raises(_Stop):
        train(cfg)
    monkeypatch.setattr(trainer_mod, "save_checkpoint", real)
    with pytest.raises(RepbendError, match="--resume"):
        train(cfg)  # a second fresh start into the same folder is refused
    resumed = train(cfg, resume=True)
    a, b = load_file(full / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    la, lb = _metrics(full), _metrics(resumed)
    assert [r["step"] for r in lb] == ["1", "2", "3", "4", "5"]
    assert [float(r["loss/total"]) for r in la] == pytest.approx([float(r["loss/total"]) for r in lb], rel=1e-6)


def test_a_full_fine_tuning_run_resumes_from_its_own_config(tiny_model_dir, built_dir, tmp_path, monkeypatch):
    """config.yaml of a full fine-tuning run leaves `lora` out (it would not load back); resuming compares the new
    config in that same form, so the run is not refused as "differs on lora"."""
    from repbend.training.config import TrainConfig

    def full_cfg(out):
        data = tiny_train_config(tiny_model_dir, built_dir, out, max_steps=4, save_every=2,
                                 layer_stats_every=0).model_dump(mode="json")
        data.pop("lora")
        return TrainConfig.model_validate({**data, "full_finetune": True, "training": {**data["training"], "lr": 1e-3}})

    straight = train(full_cfg(tmp_path / "straight"))
    real = trainer_mod.save_checkpoint

    def crash_after_save(*a, **k):
        real(*a, **k)
        raise _Stop()

    monkeypatch.setattr(trainer_mod, "save_checkpoint", crash_after_save)
    cfg = full_cfg(tmp_path / "resumed")
    with pytest.raises(_Stop):
        train(cfg)
    monkeypatch.setattr(trainer_mod, "save_checkpoint", real)
    resumed = train(cfg, resume=True)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in _metrics(resumed)] == ["1", "2", "3", "4"]


def test_resume_refuses_a_changed_config(tiny_model_dir, built_dir, tmp_path, monkeypatch):
    cfg = tiny_train_config(tiny_model_dir, built_dir, tmp_path / "run", max_steps=2, save_every=1, layer_stats_every=0)
    train(cfg)
    changed = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"r": 8})})
    monkeypatch.setattr("repbend.models.load_model", _no_load)
    with pytest.raises(RepbendError, match="lora"):
        train(changed, resume=True)


def test_divergence_stops_and_keeps_last_good_checkpoint(tiny_model_dir, built_dir, tmp_path):
    cfg = tiny_train_config(tiny_model_dir, built_dir, tmp_path / "run", max_steps=6, save_every=1,
                            layer_stats_every=0, lr=0.5)
    cfg.method.params.max_unsafe_ratio, cfg.method.params.beta = 1e-3, 5.0
    with pytest.raises(DivergenceError, match=r"max_unsafe_ratio.*last good checkpoint is .*step-00000\d"):
        train(cfg)
    ckpts = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts and (ckpts[-1] / "DONE").is_file() and (ckpts[-1] / "adapter" / "adapter_config.json").is_file()


def _no_load(*a, **k):
    raise AssertionError("the model must not be loaded before the input is checked")


def test_bad_input_fails_before_loading_the_model(tiny_model_dir, built_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("repbend.models.load_model", _no_load)
    cfg = tiny_train_config(tiny_model_dir, built_dir, tmp_path / "a")
    cfg.method.params.target_layers = [2, 7]
    with pytest.raises(ConfigError, match=r"method.target_layers.*out of range 0..4"):
        train(cfg)
    no_unsafe = write_built(tmp_path / "safe-only", make_rows(unsafe=False))
    with pytest.raises(RepbendError, match="no 'unsafe' rows"):
        train(tiny_train_config(tiny_model_dir, no_unsafe, tmp_path / "b"))
    data = tiny_train_config(tiny_model_dir, built_dir, tmp_path / "c").model_dump()
    data["lora"]["layers_to_transform"] = [9]
    with pytest.raises(ConfigError, match="lora.layers_to_transform"):
        train(TrainConfig.model_validate(data))
    with pytest.raises(ValueError, match="full_finetune"):
        TrainConfig.model_validate({**data, "full_finetune": True})
    # `lora=null` drops the section, so a LoRA config file can be switched to full fine-tuning from the CLI
    ft = TrainConfig.model_validate(apply_overrides(data, ["lora=null", "full_finetune=true"]))
    assert ft.full_finetune and "lora" not in ft.model_fields_set
    with pytest.raises(ValueError, match="repeat count must be >= 1"):
        TrainConfig.model_validate({**data, "data": {**data["data"], "repeat_kinds": {"benign": 0}}})
    typo = {**data, "lora": {**data["lora"], "layers_to_transform": None},
            "data": {**data["data"], "repeat_kinds": {"overrefusl": 3}}}
    with pytest.raises(RepbendError, match=r"repeat_kinds names kind\(s\) \['overrefusl'\]"):
        train(TrainConfig.model_validate(typo))
    with pytest.raises(ValueError, match="full_finetune"):
        TrainConfig.model_validate({**{k: v for k, v in data.items() if k != "lora"}, "full_finetune": True,
                                    "model": {"name": str(tiny_model_dir), "adapter": str(tmp_path)}})


def test_full_finetune_uses_a_frozen_copy(tiny_model_dir, built_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    data = tiny_train_config(tiny_model_dir, built_dir, tmp_path / "run", max_steps=2, lr=1e-3,
                             layer_stats_every=1).model_dump()
    del data["lora"]
    run = train(TrainConfig.model_validate({**data, "full_finetune": True}))
    trained = AutoModelForCausalLM.from_pretrained(run)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for n, p in trained.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert any(".layers.0." in n for n in changed) and not any("embed_tokens" in n for n in changed)
    steps = {r["step"] for r in csv.DictReader((run / "layers.csv").open())}
    assert steps == {"1", "2"}


@pytest.mark.parametrize("name", METHODS.names())
def test_every_registered_method_trains_without_trainer_changes(name, tiny_model_dir, built_dir, tmp_path):
    cfg = tiny_train_config(tiny_model_dir, built_dir, tmp_path / name, max_steps=2, layer_stats_every=1)
    # only layer choices are adapted to the 4-block model; everything else is the method's default
    params = {"repbend": {"target_layers": [2, 3]}, "circuit_breakers": {"target_layers": [2, 3]},
              "rmu": {"layer": 3}, "npo": {"delta": 0.1}}.get(name, {})
    cfg = TrainConfig.model_validate({**cfg.model_dump(), "method": {"name": name, "params": params}})
    run = train(cfg)
    rows = _metrics(run)
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(float(r["loss/total"]))) for r in rows)


def test_default_model_options_train_end_to_end(tiny_model_dir, built_dir, tmp_path):
    """The default-model config's RepBend options (request+response bent, per-token unsafe cap, per-token KL mean)
    go through the real trainer; the per-token KL is the batchmean KL divided by the retain tokens per row."""
    cfg = tiny_train_config(tiny_model_dir, built_dir, tmp_path / "run", max_steps=2)
    for k, v in dict(token_mode="request_response", safe_token_mode="response_all", unsafe_margin=0.2,
                     kl_reduction="token_mean").items():
        setattr(cfg.method.params, k, v)
    rows = _metrics(train(cfg))
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(float(r["loss/total"]))) for r in rows)
    # step 1 (LoRA B = 0: policy = reference) has KL 0 either way; step 2's differs by the tokens per retain row
    batch = cfg.model_copy(deep=True)
    batch.method.params.kl_reduction, batch.output_dir = "batchmean", str(tmp_path / "batchmean")
    rows_b = _metrics(train(batch))
    assert float(rows_b[1]["loss/kl"]) > 5 * float(rows[1]["loss/kl"]) > 0


def test_published_batch_options_through_the_trainer(tiny_model_dir, built_dir, tmp_path, monkeypatch):
    """paired_refusals + response_end_of_turn false (the paper configs' batch) in the real trainer: the last safe row
    of each step is the refusal of the step's first unsafe request, and no safe/unsafe response ends with the
    template's end-of-turn token (retain rows keep theirs)."""
    from transformers import AutoTokenizer

    seen = []
    real = trainer_mod.Run.loss
    monkeypatch.setattr(trainer_mod.Run, "loss", lambda self, items, p: (seen.append(items), real(self, items, p))[1])
    data = tiny_train_config(tiny_model_dir, built_dir, tmp_path / "run", max_steps=2).model_dump()
    data["data"].update(batch_size={"safe": 3, "unsafe": 2, "retain": 2}, paired_refusals=1, response_end_of_turn=False)
    rows = _metrics(train(TrainConfig.model_validate(data)))
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(float(r["loss/total"]))) for r in rows)
    eot = AutoTokenizer.from_pretrained(tiny_model_dir).convert_tokens_to_ids("<|im_end|>")
    assert len(seen) == 2
    for items in seen:
        assert [len(items[s]) for s in ("safe", "unsafe", "retain")] == [3, 2, 2]
        refusal, unsafe = items["safe"][-1], items["unsafe"][0]
        assert refusal.input_ids[:refusal.request_len] == unsafe.input_ids[:unsafe.request_len]
        assert all(e.input_ids[-1] != eot for s in ("safe", "unsafe") for e in items[s])
        assert all(e.input_ids[-1] == eot for e in items["retain"])


def test_optimizer_is_fused_adamw_on_cpu_with_the_same_updates():
    """The trainer's AdamW runs PyTorch's fused kernel on CPU and updates like the per-tensor AdamW."""
    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (7, 5, 3)]
    a = [torch.randn(s, requires_grad=True) for s in shapes]
    b = [x.detach().clone().requires_grad_(True) for x in a]
    fused = trainer_mod.make_optimizer(a, 1e-2, 0.01)
    plain = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.01, foreach=False)
    assert fused.defaults["fused"] is True and fused.defaults["lr"] == 1e-2
    for _ in range(5):
        grads = [torch.randn(s) for s in shapes]
        for x, y, g in zip(a, b, grads):
            x.grad, y.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    for x, y in zip(a, b):
        assert not torch.equal(x, x.new_zeros(x.shape))
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
