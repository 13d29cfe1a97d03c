"""The build config: YAML = defaults, list-index overrides, all errors in one message."""
from __future__ import annotations

from pathlib import Path

import pytest

from repbend.data.build_config import DataBuildConfig, load_build_config
from repbend.errors import ConfigError

YAML = Path(__file__).resolve().parents[2] / "configs" / "data-default.yaml"


def test_default_yaml_equals_builtin_defaults():
    assert load_build_config(str(YAML)) == DataBuildConfig() == load_build_config()


def test_overrides_reach_into_lists_and_sections():
    cfg = load_build_config(str(YAML), ["harmful.0.max_rows=50", "generation.batch_size=8",
                                        "harmful.1.options.files=[malicious_uses]", "decontam.embedding=true"])
    assert cfg.harmful[0].max_rows == 50 and cfg.harmful[1].options["files"] == ["malicious_uses"]
    assert cfg.generation.batch_size == 8 and cfg.decontam.embedding
    assert cfg.harmful[1].max_rows == 200 and cfg.generation.max_new_tokens_benign == 96


def test_bad_overrides_and_values_are_reported_together():
    with pytest.raises(ConfigError, match=r"harmful is a list of 2; index it with 0..1"):
        load_build_config(None, ["harmful.5.max_rows=1"])
    with pytest.raises(ConfigError, match=r"seed is a value"):
        load_build_config(None, ["seed.x=1"])
    with pytest.raises(ConfigError) as e:
        load_build_config(None, ["generation.batch_size=0", "val_fraction=2", "harmful.0.source=advbenc",
                                 "benign.0.options.file=nope"])
    msg = str(e.value)
    for part in ("generation.batch_size", "val_fraction", "Did you mean 'advbench'", "benign.0"):
        assert part in msg
