"""Model loading (aliases, folders, hub ids, PEFT adapters), the embedded default model and generation.

- :func:`load_model` ``(spec, adapter=None, *, device, dtype, trust_remote_code, for_training,
  fallback_template) -> (model, tokenizer)``
- :func:`resolve_model` ``(spec) -> ResolvedModel`` (no loading), :func:`list_aliases`
- :func:`repbend.models.generation.generate` (batched chat generation)
"""
from repbend.models.loading import ALIASES, ResolvedModel, list_aliases, load_model, resolve_model

__all__ = ["ALIASES", "ResolvedModel", "list_aliases", "load_model", "resolve_model"]
