"""Attach a saved PEFT adapter to its base model, checking first that the two fit together.

The adapter's weights must match the base: every module it adapts must exist in the base with the
same input/output sizes (checked from the safetensors header, before anything is loaded). A different
``base_model_name_or_path`` alone is only reported (paths differ between machines); different shapes
are an error.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from repbend.errors import RepbendError

_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def _module_name(key: str) -> str:
    for marker in (".lora_A.", ".lora_B.", ".lora_magnitude_vector", ".lora_embedding_A", ".lora_embedding_B"):
        if marker in key:
            key = key.split(marker)[0]
            break
    else:
        key = key.rsplit(".", 1)[0]
    return key.removeprefix("base_model.model.")


def shape_problems(base, weights: Path) -> list[str]:
    """Mismatches between LoRA weights (safetensors header only) and the base model's Linear layers."""
    from safetensors import safe_open

    problems = []
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            name = _module_name(key)
            try:
                mod = base.get_submodule(name)
            except AttributeError:
                problems.append(f"module {name} does not exist in the base model")
                continue
            shape = tuple(f.get_slice(key).get_shape())
            in_f, out_f = getattr(mod, "in_features", None), getattr(mod, "out_features", None)
            if in_f is None or len(shape) != 2:
                continue
            if ".lora_A." in key and shape[1] != in_f:
                problems.append(f"{name} takes {in_f} inputs, the adapter expects {shape[1]}")
            elif ".lora_B." in key and shape[0] != out_f:
                problems.append(f"{name} has {out_f} outputs, the adapter expects {shape[0]}")
            if len(problems) >= 3:
                break
    return problems


def _safetensor_error() -> type:
    from repbend.models.weights import SafetensorError as _SafetensorError

    return _SafetensorError


def attach_adapter(model, folder: Path, resolved, *, trainable: bool = False):
    """``PeftModel.from_pretrained(model, folder)`` after checking the adapter fits ``model``."""
    from peft import PeftModel

    folder = Path(folder).expanduser()
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise RepbendError(f"Adapter folder {folder} has no adapter_config.json; pass a folder saved by "
                           f"repbend train (or peft's save_pretrained).")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise RepbendError(f"{cfg_path} is not valid JSON ({e}).") from None
    weights = next((folder / w for w in _WEIGHTS if (folder / w).is_file()), None)
    if weights is None:
        raise RepbendError(f"Adapter folder {folder} has no adapter weights ({' or '.join(_WEIGHTS)}); "
                           f"was the training run finished?")
    want = str(cfg.get("base_model_name_or_path") or "")
    if weights.suffix == ".safetensors":
        from repbend.models.weights import damaged_weights

        damaged = damaged_weights(folder, (weights.name,))
        if damaged:
            raise RepbendError(damaged.replace("that model folder", "the adapter (or train it)"))
        problems = shape_problems(model, weights)
        if problems:
            raise RepbendError(f"Adapter {folder} does not fit base model {resolved.spec} (it was trained on "
                               f"{want or 'an unnamed base'}): {'; '.join(problems)}.")
    names = {resolved.spec, resolved.location, resolved.alias, Path(resolved.location).name,
             getattr(model.config, "_name_or_path", None)}
    if want and want not in names and Path(want.rstrip("/")).name not in names:
        print(f"repbend: adapter {folder.name} records base {want!r}, loading it on {resolved.spec!r} "
              f"(shapes match)", file=sys.stderr, flush=True)
    try:
        return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError, OSError, _safetensor_error()) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RepbendError(f"Adapter {folder} could not be loaded on {resolved.spec}: {first}") from None
