"""TrainConfig validation and `repbend validate` (every error at once, no model loaded)."""
from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from repbend.cli import app
from repbend.training.config import TrainConfig
from repbend.validate import validate_config
from train_fixtures import built_dir, tiny_train_config  # noqa: F401 (fixture)


def test_method_params_are_validated_by_the_methods_config():
    base = {"data": {"dir": "d"}, "output_dir": "o"}
    cfg = TrainConfig.model_validate({**base, "method": {"name": "repbend", "params": {"beta": 0.2}}})
    assert cfg.method.params["beta"] == 0.2 and cfg.method.params["alpha"] == 0.5  # resolved defaults
    with pytest.raises(ValueError, match=r"params.alpha.*params.bogus"):
        TrainConfig.model_validate({**base, "method": {"params": {"alpha": -1, "bogus": 1}}})
    with pytest.raises(Exception, match="Did you mean 'repbend'"):
        TrainConfig.model_validate({**base, "method": {"name": "repbnd"}})


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
