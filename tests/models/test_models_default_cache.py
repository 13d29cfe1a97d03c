"""The converted-model cache: manifest checks, corrupt-cache rebuild (no real model here).

The folder builder is exercised with a tiny saved model; fetching and assembling GGUF parts is in
test_models_embedded.py, the real GGUF conversions are in the slow tests.
"""
from __future__ import annotations

import json
import os

import pytest

from conftest import build_tiny_model, build_tiny_tokenizer
from repbend.models import default


@pytest.fixture()
def builder():
    calls = []

    def build(out):
        tok = build_tiny_tokenizer()
        build_tiny_model(tok).save_pretrained(out)
        tok.save_pretrained(out)
        calls.append(out)
        return {"test": True}

    build.calls = calls
    return build


def test_build_once_then_reuse(tmp_path, builder):
    target = tmp_path / "models" / "m"
    assert default.ensure_folder(target, builder) == target
    assert default.ensure_folder(target, builder) == target
    assert len(builder.calls) == 1
    manifest = json.loads((target / default.MANIFEST).read_text())
    assert "model.safetensors" in manifest["files"] and manifest["source"] == {"test": True}
    assert default.manifest_problems(target, verify=True) == []
    assert not list(tmp_path.glob("models/.m.partial"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "no-manifest"])
def test_corrupt_cache_is_detected_reported_and_rebuilt(tmp_path, builder, capsys, damage):
    target = tmp_path / "m"
    default.ensure_folder(target, builder)
    weights = target / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "flip":  # same size, new mtime -> re-hashed
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "delete":
        (target / "config.json").unlink()
    else:
        (target / default.MANIFEST).unlink()
    assert default.manifest_problems(target)
    default.ensure_folder(target, builder)
    assert len(builder.calls) == 2 and default.manifest_problems(target, verify=True) == []
    assert "corrupt" in capsys.readouterr().err


def test_verify_catches_same_size_same_mtime_damage(tmp_path, builder):
    target = tmp_path / "m"
    default.ensure_folder(target, builder)
    weights = target / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert default.manifest_problems(target) == []  # the cheap check trusts size + mtime
    assert default.manifest_problems(target, verify=True) == ["model.safetensors checksum mismatch"]
    default.ensure_folder(target, builder, verify=True)
    assert len(builder.calls) == 2


def test_failed_build_leaves_no_partial_folder(tmp_path):
    def broken(out):
        (out / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        default.ensure_folder(tmp_path / "m", broken)
    assert not (tmp_path / "m").exists() and not (tmp_path / ".m.partial").exists()


def test_default_is_the_first_embedded_model(tmp_path):
    from repbend.models.embedded import EMBEDDED

    assert default.MODEL is EMBEDDED[0] and default.GGUF_SHA256 == EMBEDDED[0].gguf_sha256
    assert default.default_model_dir() == EMBEDDED[0].folder and default.cache_status() == "not converted"
    EMBEDDED[0].gguf.parent.mkdir(parents=True)
    EMBEDDED[0].gguf.write_bytes(b"assembled")
    assert default.cache_status() == "not converted (GGUF assembled)"
