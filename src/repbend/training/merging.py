"""Merge a trained LoRA adapter into its base model: a full folder loadable by AutoModelForCausalLM."""
from __future__ import annotations

from pathlib import Path

from repbend.errors import RepbendError


def merge(adapter: str | Path, output: str | Path, base: str | None = None, dtype: str = "float32") -> Path:
    """Load ``base`` (default: the base recorded in the adapter) + ``adapter``, merge, save to ``output``.

    The output holds the merged weights, the tokenizer (with its chat template) and run_info.json
    naming the adapter and base it came from.
    """
    from repbend.io import write_run_info
    from repbend.models import load_model

    adapter, out = Path(adapter), Path(output)
    if not (adapter / "adapter_config.json").is_file():
        raise RepbendError(f"--adapter {adapter} is not a PEFT adapter folder (no adapter_config.json); "
                           f"pass a training run folder or a checkpoint's adapter/ folder.")
    if out.exists() and any(out.iterdir()):
        raise RepbendError(f"--output {out} exists and is not empty; choose a new folder.")
    spec = base if base is not None else str(adapter)  # an adapter folder resolves to its recorded base
    model, tokenizer = load_model(spec, adapter=adapter if base is not None else None, device="cpu", dtype=dtype)
    if not hasattr(model, "merge_and_unload"):
        raise RepbendError(f"{adapter} did not load as a LoRA adapter; nothing to merge.")
    merged = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    write_run_info(out, None, None, merged_from={"adapter": str(adapter.resolve()), "base": base or "recorded in adapter"})
    return out
