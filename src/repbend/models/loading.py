"""One model loader for everything: aliases, local folders, hub ids, PEFT adapters.

``spec`` is resolved in this order:

1. an alias of an embedded model (``default``, ``qwen2.5-coder-0.5b``, ... see ``repbend models``): built or
   verified in the repbend cache (:mod:`repbend.models.embedded`), then loaded as a folder;
2. an existing local folder: an ordinary transformers folder, or an adapter-only folder (it has
   ``adapter_config.json`` and no ``config.json``) whose base is read from the adapter config;
3. something that looks like a path (``/``, ``.``, ``~``) but does not exist: error;
4. a bare name close to an alias: did-you-mean error; anything else: a Hugging Face hub id.

Device: CUDA (bf16 where supported) when present, else CPU (fp32); ``device`` may be ``"cpu"``,
``"cuda"``, ``"cuda:1"`` or ``"auto"`` (accelerate's device map) and ``dtype`` one of :data:`DTYPES`.
A tokenizer without a pad token gets ``pad = eos`` (said once on stderr).
"""
from __future__ import annotations

import difflib
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from repbend.errors import RepbendError
from repbend.models.embedded import ALIASES, BY_NAME  # alias -> canonical name of an embedded model
from repbend.models.weights import SafetensorError as _SafetensorError, damaged_weights
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16"}
_WARNED: set[str] = set()


def _say_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        print(f"repbend: {msg}", file=sys.stderr, flush=True)


@dataclass
class ResolvedModel:
    """Where a model spec points. ``kind``: ``alias`` | ``folder`` | ``adapter`` | ``hub``."""

    spec: str
    kind: str
    location: str              # folder path or hub id (for an alias: the converted folder)
    alias: str | None = None   # canonical alias name
    base: str | None = None    # kind == "adapter": the base model spec from adapter_config.json
    status: str = ""           # alias: cached / not converted / corrupt; folder: "exists"

    def describe(self) -> str:
        extra = f" (base {self.base})" if self.base else ""
        return f"{self.spec} -> {self.kind} {self.location}{extra}" + (f" [{self.status}]" if self.status else "")


def list_aliases() -> dict[str, str]:
    """``{alias: description}`` of the built-in model aliases."""
    return {a: BY_NAME[c].description + ("" if a == c else f" (alias of {c})") for a, c in ALIASES.items()}


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1


def resolve_model(spec: str) -> ResolvedModel:
    """Resolve ``spec`` without loading (or converting) anything."""
    from repbend.models.embedded import cache_status

    if not isinstance(spec, str) or not spec.strip():
        raise RepbendError(f"Model spec must be an alias, a folder or a hub id; aliases: {', '.join(ALIASES)}.")
    spec = spec.strip()
    canon = ALIASES.get(spec.lower())
    if canon:
        model = BY_NAME[canon]
        return ResolvedModel(spec, "alias", str(model.folder), canon, status=cache_status(model))
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedModel(spec, "folder", str(path.resolve()), status="exists")
        if (path / "adapter_config.json").is_file():
            base = _adapter_config(path).get("base_model_name_or_path")
            if not base:
                raise RepbendError(f"Adapter {path} does not name its base model; pass the base as the model and "
                                   f"this folder as --adapter.")
            return ResolvedModel(spec, "adapter", str(path.resolve()), base=str(base), status="exists")
        raise RepbendError(f"Folder {path} has no config.json (not a transformers model) and no adapter_config.json; "
                           f"point to a saved model folder.")
    close = difflib.get_close_matches(spec.lower(), list(ALIASES), n=1, cutoff=0.6) or \
        [a for a in ALIASES if len(spec) >= 4 and spec.lower() in a][:1]
    if _looks_like_path(spec) or path.exists():
        hint = f" Did you mean the alias {close[0]!r}?" if close else ""
        raise RepbendError(f"Model folder {spec} does not exist.{hint} Aliases: {', '.join(ALIASES)}.")
    if "/" not in spec and close:
        raise RepbendError(f"Unknown model alias {spec!r}. Did you mean {close[0]!r}? Aliases: {', '.join(ALIASES)}.")
    return ResolvedModel(spec, "hub", spec)


def _adapter_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RepbendError(f"Cannot read {folder / 'adapter_config.json'}: {e}") from None


def cpu_bf16_kernels() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX-512, or ARM BF16). Without them (AVX2 only) a bf16
    matrix product falls back to a reference kernel about 100x slower than fp32."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_bf16_units() -> bool:
    """Whether this CPU computes bf16 products faster than fp32: AMX tiles on x86, or an ARM CPU with BF16 (which
    oneDNN reports as bf16 support only where the instructions exist). AVX512-BF16 alone is not enough: on such a
    2-core Xeon a 1024^3 bf16 matrix product ran at 73 GFLOP/s against 134 in fp32, and a RepBend training step
    under bf16 autocast took 1.5x as long as in fp32 (benchmarks/bench_train_step.py --bf16)."""
    import torch

    if platform.machine().lower() in ("aarch64", "arm64"):
        return cpu_bf16_kernels()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(amx is not None and amx())


def bf16_fast(on_gpu: bool) -> bool:
    """Whether bf16 pays here: a CUDA device that supports it, or a CPU with bf16 units."""
    import torch

    return torch.cuda.is_bf16_supported() if on_gpu else cpu_bf16_units()


def warn_slow_bf16(what: str) -> None:
    """One line when bf16 would run on a CPU whose bf16 products take the slow reference kernel."""
    if not cpu_bf16_kernels():
        _say_once(f"warning: {what} in bf16 on this CPU (no AVX-512 / bf16 units) runs matrix products about 100x "
                  f"slower than fp32; use fp32 (or precision auto) here")


def pick_device_dtype(device: str | None, dtype: str | None):
    """Resolve ``device``/``dtype`` strings to (device string or "auto", torch dtype)."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "auto":
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise RepbendError(f"Unknown device {device!r}; use cpu, cuda, cuda:N or auto.") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RepbendError(f"Device {device!r} requested but CUDA is not available; use --device cpu.")
    if dtype is None:
        on_gpu = device == "auto" and torch.cuda.is_available() or device.startswith("cuda")
        name = "bfloat16" if on_gpu and torch.cuda.is_bf16_supported() else "float16" if on_gpu else "float32"
    else:
        name = DTYPES.get(str(dtype).lower().replace("torch.", ""))
        if name is None:
            raise RepbendError(f"Unknown dtype {dtype!r}; use one of float32, bfloat16, float16.")
        if name == "bfloat16" and device == "cpu":
            warn_slow_bf16("running the model")
    return device, getattr(torch, name)


def _fix_tokenizer(tok, name: str) -> None:
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise RepbendError(f"Tokenizer of {name} has neither a pad nor an eos token; set tokenizer.pad_token.")
        tok.pad_token = tok.eos_token
        _say_once(f"tokenizer of {name} has no pad token; using its eos token {tok.eos_token!r} for padding")


def _without_stale_gguf(config):
    """``config`` without a GGUF ``quantization_config``, or None when it has none.

    A folder converted from a GGUF file (``from_pretrained(gguf_file=...)`` then ``save_pretrained``) holds
    plain dequantised tensors but keeps ``quantization_config: {quant_method: gguf}`` in its config.json.
    Loaded as is, transformers marks the model GGUF-quantised: it computes the same (checked: identical
    weights and logits) but refuses ``save_pretrained``, so merging an adapter or saving a full
    fine-tune would fail. Such a folder cannot hold GGUF tensors (those load only with ``gguf_file``).
    """
    q = getattr(config, "quantization_config", None)
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    if str(getattr(method, "value", method)).lower() != "gguf":
        return None
    del config.quantization_config
    return config


def _from_pretrained(location: str, kind: str, device: str, dtype, trust_remote_code: bool):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = {"trust_remote_code": trust_remote_code}
    damaged = damaged_weights(Path(location)) if kind != "hub" else None
    if damaged:
        raise RepbendError(damaged)
    try:
        tok = AutoTokenizer.from_pretrained(location, **kw)
        plain = _without_stale_gguf(AutoConfig.from_pretrained(location, **kw))
        if plain is not None:
            kw["config"] = plain
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, device_map="auto" if device == "auto" else None,
                                                     **kw)
    except (OSError, ValueError, KeyError, _SafetensorError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if kind == "hub":
            from huggingface_hub import constants as hub_constants

            offline = hub_constants.is_offline_mode()
            how = ("HF_HUB_OFFLINE is set, so only already-downloaded models load" if offline else
                   "no network? set HF_HUB_OFFLINE=1 to use your local hub cache")
            raise RepbendError(f"Could not load {location!r} from the Hugging Face hub ({first}); check the id and "
                               f"your access; {how}; or pass a local folder or an alias ({', '.join(ALIASES)}).") from None
        raise RepbendError(f"Could not load the model in {location} ({first}); is it a complete transformers folder?") from None
    if device != "auto":
        model.to(device)
    return model, tok


def load_model(spec: str = "default", adapter: str | os.PathLike | None = None, *, device: str | None = None,
               dtype: str | None = None, trust_remote_code: bool = False, for_training: bool = False,
               fallback_template: bool = False):
    """Load ``(model, tokenizer)`` for an alias, a local folder or a hub id, optionally with a PEFT adapter.

    ``for_training``: keep gradients and load the adapter as trainable; otherwise the model is in eval mode
    with gradients off. ``fallback_template``: give a tokenizer without a chat template repbend's plain
    template (see :mod:`repbend.models.chat`).
    """
    res = resolve_model(spec)
    if res.kind == "adapter":
        if adapter is not None:
            raise RepbendError(f"{spec} is itself an adapter folder; pass its base model as the model, or drop --adapter.")
        adapter, res = res.location, resolve_model(_base_spec(res.base))
    dev, torch_dtype = pick_device_dtype(device, dtype)
    location = res.location
    if res.kind == "alias":
        from repbend.models.embedded import ensure_model
        location = str(ensure_model(BY_NAME[res.alias]))
    model, tok = _from_pretrained(location, res.kind, dev, torch_dtype, trust_remote_code)
    name = res.alias or res.location
    if res.alias:  # adapters trained on it then record the portable alias as their base, not a cache path
        model.config._name_or_path = model.name_or_path = res.alias
    _fix_tokenizer(tok, name)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if fallback_template:
        from repbend.models.chat import use_fallback_template
        use_fallback_template(tok)
    if adapter is not None:
        from repbend.models.adapters import attach_adapter
        model = attach_adapter(model, Path(adapter), res, trainable=for_training)
    if not for_training:
        model.eval()
        model.requires_grad_(False)
    return model, tok


def _base_spec(base: str) -> str:
    """Map an adapter's recorded base to a spec: an alias name (also a converted-alias folder) or itself."""
    if Path(base).expanduser().is_dir():
        return base
    name = Path(base.rstrip("/")).name
    return name if name.lower() in ALIASES else base
