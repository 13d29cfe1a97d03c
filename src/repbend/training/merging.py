"""Merge a trained LoRA adapter into its base model: a full folder loadable by AutoModelForCausalLM."""
from __future__ import annotations

from pathlib import Path

from repbend.errors import RepbendError


def merge(adapter: str | Path, output: str | Path, base: str | None = None, dtype: str = "float32") -> Path:
    """Load ``base`` (default: the base recorded in the adapter) + ``adapter``, merge, save to ``output``.

    The output holds the merged weights, the tokenizer (with its chat template) and run_info.json
    naming the adapter and base it came from.
    """
    from repbend.io import folder_contents, output_lock, user_path

    adapter, out = user_path(adapter, "--adapter"), user_path(output, "--output")
    if not (adapter / "adapter_config.json").is_file():
        raise RepbendError(f"--adapter {adapter} is not a PEFT adapter folder (no adapter_config.json); "
                           f"pass a training run folder or a checkpoint's adapter/ folder.")
    if out.exists() and (not out.is_dir() or folder_contents(out)):
        raise RepbendError(f"--output {out} exists and is not empty; choose a new folder.")
    with output_lock(out):
        if folder_contents(out):  # another merge got there first
            raise RepbendError(f"--output {out} exists and is not empty; choose a new folder.")
        return _merge(adapter, out, base, dtype)


def _merge(adapter: Path, out: Path, base: str | None, dtype: str) -> Path:
    from repbend.io import write_run_info
    from repbend.models import load_model

    spec = base if base is not None else str(adapter)  # an adapter folder resolves to its recorded base
    model, tokenizer = load_model(spec, adapter=adapter if base is not None else None, device="cpu", dtype=dtype)
    if not hasattr(model, "merge_and_unload"):
        raise RepbendError(f"{adapter} did not load as a LoRA adapter; nothing to merge.")
    merged = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    write_run_info(out, None, None, kind="merge", merged_from={"adapter": str(adapter.resolve()), "base": base or "recorded in adapter"})
    return out
