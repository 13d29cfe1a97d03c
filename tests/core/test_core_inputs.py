"""Bad config files and values give one-line errors, never a traceback or a silently accepted value."""
from __future__ import annotations

import pytest
from pydantic import Field

from repbend.cli import main
from repbend.config import Section, load_config, read_yaml
from repbend.errors import ConfigError


class Knobs(Section):
    lr: float = Field(1e-5, gt=0)
    scale: float | None = None


def _cli(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.mark.parametrize("raw", [b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe\xfd", "lr: 1e-5\nname: caf\u00e9\n".encode("latin-1"),
                                 b"lr: 1\x00\x01\x02"])
def test_binary_or_non_utf8_config_is_a_one_line_error(tmp_path, capsys, raw):
    path = tmp_path / "bad.yaml"
    path.write_bytes(raw)
    with pytest.raises(ConfigError):
        read_yaml(path)
    code, _, err = _cli(capsys, "validate", str(path))
    assert code == 2
    assert err.startswith("error:") and err.strip().count("\n") == 0 and "Traceback" not in err


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "'inf'", "'nan'"])
def test_infinite_or_nan_floats_are_rejected(tmp_path, value):
    path = tmp_path / "k.yaml"
    path.write_text(f"lr: 0.1\nscale: {value}\n")
    with pytest.raises(ConfigError, match="scale"):
        load_config(Knobs, path)
    with pytest.raises(ConfigError, match="lr"):
        load_config(Knobs, data={}, overrides=[f"lr={value}"])


def test_infinite_learning_rate_fails_train_validation(tmp_path, capsys):
    from repbend.paths import resolve_config

    code, _, err = _cli(capsys, "validate", str(resolve_config("train-default")), "training.lr=.inf")
    assert code == 2 and "training.lr" in err
