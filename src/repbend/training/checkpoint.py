"""Checkpoints and resume: ``<run>/checkpoints/step-NNNNNN/``.

A checkpoint holds the trainable weights only (LoRA: the adapter tensors, not the frozen base; full fine-tuning: the
trainable blocks) as safetensors, the optimizer and per-process RNG states (Python, NumPy, torch, CUDA) written by
``accelerator.save_state`` and loaded with ``torch.load(weights_only=True)`` (tensors and plain containers only: a
planted pickle cannot run code), and the loop position (:class:`TrainState`: optimizer step, sampler position,
scheduler) as JSON in ``train_state.json``. With DeepSpeed/FSDP accelerate writes its own sharded formats (loaded by
those libraries). A LoRA checkpoint also carries ``adapter/`` (``PeftModel.from_pretrained``-loadable) so
intermediate steps can be evaluated.

``manifest.json`` lists every file of the checkpoint with its size and sha256; ``DONE`` is written last. Resuming
verifies the newest checkpoint against its manifest and loads it; a checkpoint that fails (a truncated, edited or
added file, one that does not load, an RNG state that was not applied) is reported in one warning line and the
previous one is tried; every process of a distributed run agrees on the one it resumes from. None usable: one
error line. Checkpoints of an older repbend (no manifest, the loop state pickled in ``custom_checkpoint_0.pkl``)
are loaded unverified with the same code-free loaders (``weights_only=True``; accelerate never sees that file).

Resuming checks that the run folder's saved config matches the new one on everything that shapes
the weights (model, method, LoRA, full_finetune, data, seed, batch sizes) BEFORE any model is loaded.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import yaml

from repbend.config import saved_dump
from repbend.errors import RepbendError
from repbend.io import atomic_write_json, claim_output, remove_run_files, sha256_file
from repbend.training.config import TrainConfig

_STEP = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
STATE_FILE = "train_state.json"
LEGACY_STATE = "custom_checkpoint_0.pkl"   # where checkpoints without a manifest kept the loop state
FORMAT = "repbend-checkpoint/1"
# Settings that must not change between a run and its resumption (dotted paths into the config).
MUST_MATCH = ("model", "method", "lora", "full_finetune", "data.dir", "data.batch_size", "data.max_request_tokens",
              "data.max_response_tokens", "data.length_bucketing", "training.seed", "training.grad_accum",
              "training.lr", "training.schedule", "training.warmup_steps", "training.precision")


class TrainState:
    """Everything about the loop position that accelerate does not save by itself (saved as JSON)."""

    def __init__(self, sampler, scheduler):
        self.step = 0
        self.sampler = sampler
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        return {"step": self.step, "sampler": self.sampler.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self.scheduler.load_state_dict(state["scheduler"])


def checkpoints(run_dir: Path) -> list[Path]:
    d = run_dir / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STEP.match(p.name)) and (p / "DONE").is_file()]
    return [p for _, p in sorted(found)]


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def config_diff(old: dict, new: dict, keys: tuple[str, ...] = MUST_MATCH) -> list[str]:
    """The dotted ``keys`` on which two dumped train configs differ (default: what shapes the weights)."""
    return [k for k in keys if _get(old, k) != _get(new, k)]


def _notice(msg: str) -> None:
    print(f"repbend: {msg}", file=sys.stderr, flush=True)


def main_rank() -> bool:
    """Whether this is the main process (torchrun/accelerate set RANK; a plain run is rank 0)."""
    return int(os.environ.get("RANK", "0")) == 0


def read_run_config(run_dir: Path) -> dict:
    """The run folder's saved ``config.yaml`` as a dict, with one-line errors for a damaged file."""
    path = run_dir / "config.yaml"
    try:
        old = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        why = "is not UTF-8 text" if isinstance(e, UnicodeDecodeError) else "is not valid YAML"
        raise RepbendError(f"The run's saved config {path} {why}; restore it from your config file (the same one "
                           f"you resume with), or pass --overwrite to start the run over.") from None
    if old is None:
        old = {}
    if not isinstance(old, dict):
        raise RepbendError(f"The run's saved config {path} holds a {type(old).__name__}, not a mapping; restore it "
                           f"from your config file, or pass --overwrite to start the run over.")
    return old


def _finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "run_info.json").read_text(encoding="utf-8")).get("status") == "finished"
    except (OSError, ValueError, AttributeError):
        return False


def prepare_run_dir(cfg: TrainConfig, resume: bool, overwrite: bool = False) -> list[Path]:
    """Check the output folder; return the verified checkpoints to resume from, newest first ([] = fresh start).

    Call it while holding the folder's :func:`repbend.io.output_lock`.
    """
    run_dir = Path(cfg.output_dir)
    if resume and overwrite:
        raise RepbendError("--resume continues the run in output_dir and --overwrite starts it over; pass one of "
                           "them, not both.")
    main = main_rank()
    if overwrite and not main:  # the main process clears the folder; the others start fresh with it
        return []
    found_kind = claim_output(run_dir, "train", overwrite=overwrite)
    if found_kind != "train":
        return []
    if overwrite:
        _notice(f"--overwrite: removing the earlier run in {run_dir} and starting over")
        remove_run_files(run_dir, "train")
        return []
    found = checkpoints(run_dir)
    if not resume:
        more = ("--resume to continue it or --overwrite to start it over" if found else
                "--resume or --overwrite to start it over (it stopped before its first checkpoint)"
                if not _finished(run_dir) else "--overwrite to train it again")
        raise RepbendError(f"output_dir {run_dir} already holds a training run; pass {more}, or choose another "
                           f"output_dir.")
    if not found:
        if _finished(run_dir):
            raise RepbendError(f"--resume: {run_dir} holds a finished run without checkpoints; nothing to resume. "
                               f"Pass --overwrite to train it again, or choose another output_dir.")
        if main:
            _notice(f"--resume: {run_dir} has no checkpoint yet (the run stopped before its first save); starting "
                    f"it from scratch")
            remove_run_files(run_dir, "train")
        return []
    if not (run_dir / "config.yaml").is_file():
        raise RepbendError(f"--resume: {run_dir} has checkpoints but no config.yaml to check the new config against; "
                           f"restore it (the config the run started with), or pass --overwrite to start over.")
    diff = config_diff(read_run_config(run_dir), saved_dump(cfg))   # both in config.yaml's form
    if diff:
        raise RepbendError(f"--resume: the config differs from the run in {run_dir} on {', '.join(diff)} "
                           f"(adapter/base/method mismatch); resume with the original config or start a new output_dir.")
    good = []
    for ckpt in reversed(found):
        problem = verify_checkpoint(ckpt)
        if problem:
            if main:
                _notice(f"checkpoint {ckpt} is damaged ({problem}); trying the previous one")
        else:
            good.append(ckpt)
    if not good:
        raise RepbendError(f"--resume: no usable checkpoint in {run_dir / 'checkpoints'} (every one failed its "
                           f"check, see above); pass --overwrite to start the run over.")
    return good


# ---------------------------------------------------------------- writing, verifying, loading

def _listing(ckpt: Path) -> list[str]:
    """Every file of a checkpoint (relative paths) except the manifest and DONE."""
    return [p.relative_to(ckpt).as_posix() for p in sorted(ckpt.rglob("*"))
            if p.is_file() and p.relative_to(ckpt).as_posix() not in (MANIFEST, "DONE")]


def write_manifest(ckpt: Path, step: int) -> None:
    files = {rel: {"size": (ckpt / rel).stat().st_size, "sha256": sha256_file(ckpt / rel)} for rel in _listing(ckpt)}
    atomic_write_json(ckpt / MANIFEST, {"format": FORMAT, "step": step, "files": files})


def verify_checkpoint(ckpt: Path) -> str | None:
    """None if every file in ``ckpt`` matches its manifest, else what is wrong (one short phrase)."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or STATE_FILE not in files:
            return f"{MANIFEST} lists no {STATE_FILE}"
    except FileNotFoundError:
        if (ckpt / LEGACY_STATE).is_file():  # an older repbend's checkpoint: loaded with the same safe loaders
            return None
        return f"no {MANIFEST}: cut off while being written, so it cannot be verified"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    extra = sorted(set(_listing(ckpt)) - set(files))
    if extra:
        return f"{extra[0]} is not in its {MANIFEST} (added after the checkpoint was written)"
    for rel, entry in files.items():
        p = ckpt / rel
        if not p.is_file():
            return f"{rel} is missing"
        try:
            if p.stat().st_size != entry["size"]:
                return f"{rel} has {p.stat().st_size} bytes, the manifest says {entry['size']} (truncated?)"
            if sha256_file(p) != entry["sha256"]:
                return f"{rel} differs from its checksum in {MANIFEST}"
        except (TypeError, KeyError):
            return f"{MANIFEST} entry for {rel} is malformed"
    return None


def _rng_file(ckpt: Path, process_index: int) -> Path:
    return ckpt / f"random_states_{process_index}.pkl"


def load_checkpoint(accelerator, candidates: list[Path], state: TrainState, *, deepspeed: bool) -> Path:
    """Load the first checkpoint of ``candidates`` (newest first) that loads completely; warn about the others."""
    import torch

    errors = (RepbendError, RuntimeError, ValueError, KeyError, TypeError, OSError, EOFError, IndexError,
              AttributeError, pickle.UnpicklingError)
    try:
        from safetensors import SafetensorError
        errors += (SafetensorError,)
    except ImportError:  # pragma: no cover
        pass
    for ckpt in candidates:
        try:
            if not deepspeed and not _rng_file(ckpt, accelerator.process_index).is_file():
                raise RepbendError(f"it has no RNG state for process {accelerator.process_index} (resume with the "
                                   f"number of processes that wrote it)")
            with _state_view(ckpt) as folder:
                accelerator.load_state(str(folder), **({} if deepspeed else {"strict": False}))
            if not deepspeed:  # accelerate skips an RNG file it cannot read without a word: check it was applied
                from accelerate.utils import load

                saved = load(_rng_file(ckpt, accelerator.process_index))
                if not torch.equal(torch.get_rng_state(), saved["torch_manual_seed"]):
                    raise RepbendError("its RNG state did not load")
            state.load_state_dict(_read_state(ckpt))
            ok = True
        except errors as e:
            if isinstance(e, pickle.UnpicklingError):
                why = "a file holds pickled objects other than tensors; refused, as loading them could run code"
            else:
                why = f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0][:200]
            _notice(f"checkpoint {ckpt} could not be loaded ({why}); trying the previous one")
            ok = False
        if accelerator.num_processes > 1:  # every process resumes from the same checkpoint
            failed = torch.tensor([0.0 if ok else 1.0], device=accelerator.device)
            ok = float(accelerator.reduce(failed, reduction="sum")) == 0
        if ok:
            if accelerator.is_main_process:
                _notice(f"resuming from {ckpt} (step {state.step})")
            return ckpt
    raise RepbendError(f"--resume: no checkpoint in {candidates[0].parent} could be loaded (see the lines above); "
                       f"pass --overwrite to start the run over.")


@contextmanager
def _state_view(ckpt: Path):
    """The folder accelerate loads: ``ckpt`` itself, or for an older checkpoint a view of it without the pickled loop
    state (accelerate would unpickle it with code allowed; :func:`_read_state` reads it safely instead)."""
    if not (ckpt / LEGACY_STATE).is_file():
        yield ckpt
        return
    with tempfile.TemporaryDirectory(prefix="repbend-ckpt-") as tmp:
        for entry in ckpt.iterdir():
            if entry.name != LEGACY_STATE:
                (Path(tmp) / entry.name).symlink_to(entry.resolve())
        yield Path(tmp)


def _read_state(ckpt: Path) -> dict:
    if (ckpt / STATE_FILE).is_file() or not (ckpt / LEGACY_STATE).is_file():
        return json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    import torch

    if main_rank():
        _notice(f"{ckpt} has no {MANIFEST} (written by an older repbend): its files are not verified, only loaded "
                f"without running pickled code")
    return torch.load(ckpt / LEGACY_STATE, map_location="cpu", weights_only=True)


def only_trainable_hook(models, weights, output_dir) -> None:
    """accelerate save hook: keep only trainable tensors (LoRA adapters, unfrozen blocks) in the checkpoint."""
    for model, state in zip(models, weights):
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        for key in [k for k in state if k not in keep]:
            del state[key]


def save_checkpoint(accelerator, run_dir: Path, step: int, unwrapped, keep: int, state: TrainState) -> Path:
    path = run_dir / "checkpoints" / f"step-{step:06d}"
    if accelerator.is_main_process and path.exists():  # left by an earlier attempt (or damaged): write it anew
        shutil.rmtree(path)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        atomic_write_json(path / STATE_FILE, state.state_dict())
        if hasattr(unwrapped, "peft_config"):
            unwrapped.save_pretrained(str(path / "adapter"))
    accelerator.wait_for_everyone()  # every process's RNG file is on disk before the manifest lists them
    if accelerator.is_main_process:
        write_manifest(path, step)
        (path / "DONE").write_text(str(step))
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path
