"""TrainConfig validation and `repbend validate` (every error at once, no model loaded)."""
from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from repbend.cli import app
from repbend.config import validate_data
from repbend.training.config import TrainConfig
from repbend.validate import validate_config
from train_fixtures import built_dir, tiny_train_config  # noqa: F401 (fixture)


def test_method_params_are_validated_by_the_methods_config():
    from repbend.methods.npo import NPOConfig
    from repbend.methods.repbend import RepBendConfig

    base = {"data": {"dir": "d"}, "output_dir": "o"}
    cfg = TrainConfig.model_validate({**base, "method": {"name": "repbend", "params": {"beta": 0.2}}})
    assert isinstance(cfg.method.params, RepBendConfig)  # typed once, at load
    assert cfg.method.params.beta == 0.2 and cfg.method.params.alpha == 0.5  # resolved defaults
    assert isinstance(TrainConfig.model_validate({**base, "method": {"name": "npo"}}).method.params, NPOConfig)
    _, errors = validate_data(TrainConfig, {**base, "method": {"params": {"alpha": -1, "bogus": 1}}})
    assert len(errors) == 1 and errors[0].startswith("method.params: alpha: ") and "; bogus: unknown key" in errors[0]
    _, errors = validate_data(TrainConfig, {**base, "method": {"name": "repbend", "params": {"delta": 1}}})
    assert errors == ["method.params: delta: unknown key (remove it or check its spelling)"]  # another method's field
    with pytest.raises(Exception, match="Did you mean 'repbend'"):
        TrainConfig.model_validate({**base, "method": {"name": "repbnd"}})
    with pytest.raises(ValueError, match="params.name 'npo' differs"):
        TrainConfig.model_validate({**base, "method": {"name": "repbend", "params": {"name": "npo"}}})
    # the dump keeps the shape users write (no tag inside params) and loads back to the same config
    dumped = cfg.model_dump(mode="json")
    assert "name" not in dumped["method"]["params"] and dumped["method"]["name"] == "repbend"
    assert TrainConfig.model_validate(dumped) == cfg
    with pytest.raises(ValueError, match="beta"):   # assignments are validated too
        cfg.method.params.beta = -1
    with pytest.raises(ValueError, match="params are 'repbend' options but name is 'npo'"):
        cfg.method.name = "npo"


def test_paired_refusals_must_fit_the_batch():
    base = {"data": {"dir": "d", "batch_size": {"safe": 8, "unsafe": 2, "retain": 4}, "paired_refusals": 4},
            "output_dir": "o"}
    with pytest.raises(ValueError, match="paired_refusals: 4 refusals per step do not fit batch_size.unsafe 2"):
        TrainConfig.model_validate(base)
    ok = TrainConfig.model_validate({**base, "data": {**base["data"], "batch_size": {"safe": 8, "unsafe": 8}}})
    assert ok.data.paired_refusals == 4 and ok.data.response_end_of_turn


def test_validate_reports_every_error_without_loading(tiny_model_dir, built_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("repbend.models.load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    cfg = tiny_train_config(tiny_model_dir, built_dir, tmp_path / "run").model_dump(mode="json")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(cfg))
    assert validate_config(good) == ("train", [])
    cfg["method"]["params"]["target_layers"] = [1, 9]
    cfg["lora"]["layers_to_transform"] = [7]
    cfg["data"]["dir"] = str(tmp_path / "missing")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    kind, errors = validate_config(bad)
    assert kind == "train" and len(errors) == 3
    assert any("data.dir" in e for e in errors) and any("method.target_layers" in e for e in errors)
    assert any("lora.layers_to_transform" in e for e in errors)
    result = CliRunner().invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2 and result.output.count("error:") == 3
    result = CliRunner().invoke(app, ["validate", str(good), "training.max_steps=0", "training.nope=1"])
    assert result.exit_code == 2 and "training.max_steps" in result.output and "training.nope" in result.output


@pytest.mark.parametrize("full_finetune", [True, False])
def test_the_resolved_config_of_a_run_loads_back_unchanged(tmp_path, full_finetune):
    """A run folder's config.yaml is what `repbend train -c` reads: with full fine-tuning it must not carry the
    lora section that such a config rejects."""
    from repbend.config import dump_config, load_config

    raw = {"data": {"dir": str(tmp_path)}, "output_dir": str(tmp_path / "run"), "full_finetune": full_finetune}
    cfg = load_config(TrainConfig, data=raw)
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    again = load_config(TrainConfig, tmp_path / "config.yaml")
    assert again == cfg
    assert ("lora" in yaml.safe_load(dump_config(cfg))) == (not full_finetune)


def test_train_takes_a_shipped_config_by_name(capsys, tmp_path):
    """`repbend train -c NAME` finds the shipped config (a pip install has no configs/ folder to point at);
    here it stops at the missing data folder, which shows the name was resolved and validated."""
    from cli_helpers import cli, one_line_error

    code, _, err = cli(capsys, "train", "-c", "train-qwen2.5-coder-0.5b", f"data.dir={tmp_path / 'nodata'}")
    one_line_error(code, err, "nodata", "has no train.jsonl")
    code, _, err = cli(capsys, "train", "-c", "no-such-config")
    one_line_error(code, err, "no-such-config")


def test_precision_auto_follows_the_hardware_and_slow_bf16_is_said(monkeypatch, capsys):
    import repbend.models.loading as loading
    from repbend.training.config import resolve_precision

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(loading, "_WARNED", set())
    for native, onednn, want in ((True, True, "bf16"), (False, True, "fp32"), (False, False, "fp32")):
        monkeypatch.setattr(loading, "cpu_bf16_units", lambda n=native: n)
        monkeypatch.setattr(loading, "cpu_bf16_kernels", lambda o=onednn: o)
        assert resolve_precision("auto") == want
        assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"   # explicit choices kept
        assert ("100x slower" in capsys.readouterr().err) == (not onednn)   # ... bf16 without any kernel: said
    monkeypatch.undo()
    assert isinstance(loading.cpu_bf16_units(), bool) and isinstance(loading.cpu_bf16_kernels(), bool)
    assert TrainConfig.model_validate({"data": {"dir": "d"}, "output_dir": "o",
                                       "training": {"precision": "auto"}}).training.precision == "auto"


def test_bf16_pays_on_x86_only_with_amx(monkeypatch):
    """AVX512-BF16 without AMX computes bf16 products slower than fp32, so ``auto`` keeps fp32 there."""
    import torch

    import repbend.models.loading as loading

    monkeypatch.setattr(loading.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    for amx in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda a=amx: a, raising=False)
        assert loading.cpu_bf16_units() is amx
