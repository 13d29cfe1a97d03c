"""``train(cfg) -> run folder``: one accelerate loop for every registered method.

Per micro-batch (see :meth:`Run.loss`): collate the rows of the splits into right-padded batches
(``data.passes``: all splits in ONE batch, or splits of similar length together, each batch padded to its
longest row), run no-grad reference passes over the splits that need the reference (LoRA: same network with
the adapter disabled), policy passes with gradients over the splits that need the policy, then
``loss, parts = method(batch, policy, reference, progress)``. Nothing here knows a method's name:
the method's ``needs()`` decides which splits, layers and logits are computed.

Gradient accumulation: each micro-batch loss is already a mean; ``accelerator.backward`` divides it
by ``grad_accum``, so one optimizer step sees the mean over micro-batches (no per-token re-weighting
across micro-batches). The scheduler steps once per optimizer step (not per process).
"""
from __future__ import annotations

import csv
import math
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from repbend.errors import ConfigError, DivergenceError, RepbendError
from repbend.io import output_lock, write_run_info
from repbend.methods.base import Need
from repbend.seeding import seed_everything
from repbend.training.checkpoint import (TrainState, load_checkpoint, main_rank, only_trainable_hook, prepare_run_dir,
                                        save_checkpoint)
from repbend.training.config import TrainConfig, checked_method, model_shape, resolve_precision
from repbend.training.data import (StepSampler, budget_note, collate_groups, encode_pools, load_rows, repeat_kinds,
                                   rows_of, split_rows, width_groups)
from repbend.training.forward import forward_groups, head_fn
from repbend.training.model_setup import build_models
from repbend.training.telemetry import Telemetry, layer_stats


class Run:
    """Everything one training run holds; :meth:`loss` is the whole training step's maths."""

    def __init__(self, accelerator, model, reference, ref_context, method, pad_id: int, full_logits: bool,
                 passes: str = "auto"):
        self.acc, self.model, self.method, self.pad_id, self.full_logits = accelerator, model, method, pad_id, full_logits
        self.by_length = resolve_passes(passes, accelerator)
        self.reference_model = reference if reference is not None else model
        self.ref_context = ref_context
        unwrapped = accelerator.unwrap_model(model)
        self.head = head_fn(unwrapped.get_output_embeddings())
        ref_head = head_fn((reference or unwrapped).get_output_embeddings())
        self.ref_head = lambda x: _in(ref_context, ref_head, x)
        needs = method.needs()
        self.policy_needs = {s: n for s, n in needs.items() if n.policy}
        self.reference_needs = {s: n for s, n in needs.items() if n.reference}

    def batch(self, items):
        """``(groups, splits)``: the padded ``(batch, spans)`` of each pass and every split's rows (each at the
        width of its pass)."""
        groups = collate_groups(items, self.pad_id, width_groups(items) if self.by_length else None)
        groups = [(b.to(self.acc.device), spans) for b, spans in groups]
        return groups, {s: rows_of(b, sl) for b, spans in groups for s, sl in spans.items()}

    def loss(self, items, progress: float):
        groups, splits = self.batch(items)
        self.method.check_batch(splits)
        with torch.no_grad(), self.ref_context(), self.acc.autocast():
            reference = forward_groups(self.reference_model, groups, self.reference_needs, self.ref_head,
                                       self.full_logits)
        policy = forward_groups(self.model, groups, self.policy_needs, self.head, self.full_logits)
        loss, parts = self.method(splits, policy, reference, progress)
        tokens = sum(int(b.attention_mask.sum()) for b, _ in groups)
        return loss, parts, tokens

    @torch.no_grad()
    def probe(self, items) -> list[dict]:
        """Per-layer policy-vs-reference stats on the safe/unsafe rows of ``items`` (telemetry)."""
        present = [s for s in ("safe", "unsafe") if s in items]
        if not present:
            return []
        groups, splits = self.batch({s: items[s] for s in present})
        n = self.acc.unwrap_model(self.model).config
        all_layers = Need(layers=tuple(range(getattr(n, "text_config", n).num_hidden_layers + 1)))
        needs = {s: all_layers for s in present}
        self.model.eval()  # no dropout: the stats compare the weights, not a dropout sample
        try:
            pol = forward_groups(self.model, groups, needs, self.head)
            with self.ref_context():
                ref = forward_groups(self.reference_model, groups, needs, self.ref_head)
        finally:
            self.model.train()
        return [{"split": s, **row} for s in present for row in layer_stats(splits[s], pol[s], ref[s])]


def resolve_passes(passes: str, acc) -> bool:
    """Whether a step runs its splits in passes by length (``data.passes``); DDP, FSDP and DeepSpeed need one."""
    from accelerate.utils import DistributedType

    distributed = acc.distributed_type != DistributedType.NO
    if passes == "by_length" and distributed:
        raise ConfigError(f"data.passes=by_length runs several forward passes per backward, which "
                          f"{acc.distributed_type.value} does not allow; set data.passes to auto or one.")
    return passes == "by_length" or (passes == "auto" and not distributed)


def _in(ctx, fn, x):
    with ctx():
        return fn(x)


def _agree_divergence(acc, message: str | None) -> None:
    """Raise DivergenceError on every process if any process diverged (keeps DDP from hanging)."""
    flag = torch.tensor([1.0 if message else 0.0], device=acc.device)
    if acc.num_processes > 1:
        flag = acc.reduce(flag, reduction="sum")
    if float(flag) > 0:
        raise DivergenceError(message or "another process diverged (NaN/inf or exploding representations)")


def _mean_across(acc, values: dict[str, float]) -> dict[str, float]:
    if acc.num_processes == 1 or not values:
        return values
    keys = sorted(values)
    t = acc.reduce(torch.tensor([values[k] for k in keys], device=acc.device, dtype=torch.float64), reduction="mean")
    return dict(zip(keys, t.tolist()))


def make_optimizer(params, lr: float, weight_decay: float, acc=None) -> torch.optim.Optimizer:
    """AdamW with PyTorch's fused kernel where it runs (parameters on CPU or CUDA, not under DeepSpeed, which
    brings its own): one pass over each tensor instead of a dozen elementwise ops. On the default model's 135M
    parameters an update takes 0.10 s fused against 0.55 s with the per-tensor loop PyTorch picks on CPU
    (docs/PERFORMANCE.md); the update is the same formula, rounded in another order (last-bit differences)."""
    from accelerate.utils import DistributedType

    deepspeed = acc is not None and acc.distributed_type == DistributedType.DEEPSPEED
    fused = not deepspeed and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train ``cfg`` (optionally resuming from the run folder's last good checkpoint); return the run folder.

    The run holds an exclusive lock on its folder throughout (a second run there fails at once). ``overwrite``
    removes an earlier run in the folder (or another kind of run) and starts over.
    """
    # ---- cheap checks first: config, files, layer ranges, data splits (no model weights loaded yet) ----
    errors, method = checked_method(cfg, model_shape(cfg.model.name))  # the method is built once (None: shape unknown)
    if errors:
        raise ConfigError("Invalid training config: " + "; ".join(errors))
    with output_lock(Path(cfg.output_dir), enabled=main_rank()):
        return _train(cfg, resume, overwrite, method)


def _train(cfg: TrainConfig, resume: bool, overwrite: bool, method) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from transformers import get_scheduler

    t_start = time.time()
    if not torch.cuda.is_available():   # CPU training: reuse freed memory instead of mmap/munmap per step
        from repbend.memory import keep_freed_memory

        keep_freed_memory()
    run_dir, tc = Path(cfg.output_dir), cfg.training
    candidates = prepare_run_dir(cfg, resume, overwrite)
    rows = repeat_kinds(load_rows(cfg.data.dir), cfg.data.repeat_kinds)
    if method is not None:
        split_rows(rows, list(method.needs()), paired=cfg.data.paired_refusals > 0)  # a missing split fails here
    # cpu=True without CUDA: accelerate then sees torchrun's WORLD_SIZE and uses gloo (MULTI_CPU)
    precision = resolve_precision(tc.precision)
    acc = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", gradient_accumulation_steps=tc.grad_accum,
                      cpu=not torch.cuda.is_available())
    if tc.precision == "auto" and acc.is_main_process:
        print(f"repbend: training.precision auto -> {precision} on {acc.device.type}", flush=True)
    note = budget_note(cfg, acc.num_processes)
    if note and acc.is_main_process:
        print(note, flush=True)
    seed_everything(tc.seed)
    pair, method = build_models(cfg, method)
    needs = method.needs()
    pools, ids = encode_pools(pair.tokenizer, rows, list(needs), cfg.data)
    sampler = StepSampler(pools, cfg.data.batch_size, tc.seed, acc.process_index, acc.num_processes,
                          cfg.data.length_bucketing, cfg.data.bucket_batches, cfg.data.paired_refusals, ids=ids)
    # ---- model, optimizer, scheduler, checkpoint hooks ----
    params = [p for p in pair.model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, tc.lr, tc.weight_decay, acc)
    scheduler = get_scheduler(tc.schedule, optimizer, num_warmup_steps=tc.warmup_steps, num_training_steps=tc.max_steps)
    model, optimizer = acc.prepare(pair.model, optimizer)
    reference = pair.reference.to(acc.device) if pair.reference is not None else None
    state = TrainState(sampler, scheduler)   # saved as JSON next to accelerate's state (checkpoint.py)
    acc.register_save_state_pre_hook(only_trainable_hook)
    unwrapped = acc.unwrap_model(model)
    sharded = acc.distributed_type == DistributedType.FSDP or (
        acc.distributed_type == DistributedType.DEEPSPEED and acc.state.deepspeed_plugin.zero_stage == 3)
    run = Run(acc, model, reference, pair.reference_context(unwrapped), method, pair.tokenizer.pad_token_id, sharded,
              cfg.data.passes)
    check_items = StepSampler(pools, cfg.data.batch_size, tc.seed, paired_refusals=cfg.data.paired_refusals,
                              ids=ids).next()
    method.check_batch(run.batch(check_items)[1])  # bad data fails here, before the first step
    tele = _telemetry(run_dir, acc.is_main_process)
    ckpt = None
    if candidates:
        deepspeed = acc.distributed_type == DistributedType.DEEPSPEED  # DS loads its own full checkpoint
        ckpt = load_checkpoint(acc, candidates, state, deepspeed=deepspeed)  # only trainable tensors saved
        _truncate_logs(tele, state.step)
    elif acc.is_main_process:
        write_run_info(run_dir, cfg, tc.seed, kind="train", status="running", precision=precision, **pair.info)
    acc.wait_for_everyone()
    bar = tqdm(total=tc.max_steps, initial=state.step, desc="train", disable=not acc.is_main_process)
    last_ckpt = ckpt
    try:
        while state.step < tc.max_steps:
            t0, sums, tokens, progress = time.perf_counter(), defaultdict(float), 0, state.step / tc.max_steps
            for _ in range(tc.grad_accum):
                items = sampler.next()
                with acc.accumulate(model):
                    message = None
                    try:
                        loss, parts, n_tok = run.loss(items, progress)
                        if not torch.isfinite(loss):
                            message = f"loss is {float(loss)} at step {state.step + 1}"
                    except DivergenceError as e:
                        message = str(e)
                    _agree_divergence(acc, message)
                    acc.backward(loss)
                    if acc.sync_gradients:  # (DeepSpeed clips inside its engine and returns None here)
                        gn = acc.clip_grad_norm_(params, tc.max_grad_norm or float("inf"))
                        gnorm = float(gn) if gn is not None else float("nan")
                        _agree_divergence(acc, None if gn is None or math.isfinite(gnorm)
                                          else f"gradient norm is {gnorm} at step {state.step + 1}")
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                sums["loss/total"] += float(loss.detach()) / tc.grad_accum
                for k, v in parts.items():
                    sums[k] += v / tc.grad_accum
                tokens += n_tok
            scheduler.step()
            state.step += 1
            bar.update(1)
            if state.step % tc.log_every == 0 or state.step == tc.max_steps:
                vals = _mean_across(acc, dict(sums))
                dt = time.perf_counter() - t0
                tok = int(_mean_across(acc, {"t": float(tokens)})["t"] * acc.num_processes)
                tele.log("metrics", state.step, {"lr": scheduler.get_last_lr()[0], **vals, "grad_norm": gnorm,
                                                 "tokens": tok, "step_seconds": dt, "tokens_per_second": tok / dt})
                bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in vals.items()})
            if tc.layer_stats_every and state.step % tc.layer_stats_every == 0:
                tele.log_layers(state.step, run.probe(items))
            if tc.eval_every and state.step % tc.eval_every == 0:
                _evaluate(run, cfg, pair.tokenizer, tele, state.step)
            if tc.save_every and state.step % tc.save_every == 0 and state.step < tc.max_steps:
                last_ckpt = save_checkpoint(acc, run_dir, state.step, unwrapped, tc.keep_checkpoints, state)
    except DivergenceError as e:
        where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
        raise DivergenceError(f"Training stopped: {e}; {where}.") from None
    finally:
        bar.close()
    _save_final(acc, model, unwrapped, pair.tokenizer, run_dir)
    if acc.is_main_process:
        tele.plot()
        write_run_info(run_dir, cfg, tc.seed, kind="train", status="finished", steps=state.step,
                       wall_seconds=round(time.time() - t_start, 1), num_processes=acc.num_processes, precision=precision,
                       **pair.info)
    tele.close()
    acc.wait_for_everyone()
    return run_dir


_LOG_ERRORS = (ValueError, KeyError, TypeError, UnicodeDecodeError, csv.Error)


def _telemetry(run_dir: Path, enabled: bool) -> Telemetry:
    try:
        return Telemetry(run_dir, enabled=enabled)
    except _LOG_ERRORS as e:
        raise RepbendError(_log_problem(run_dir, e)) from None


def _truncate_logs(tele: Telemetry, step: int) -> None:
    """Drop log rows after the resumed step; a damaged log is one error line, not a traceback."""
    try:
        tele.truncate_after(step)
    except _LOG_ERRORS as e:
        raise RepbendError(_log_problem(tele.run_dir, e)) from None


def _log_problem(run_dir: Path, e: Exception) -> str:
    bad = next((p for p in (run_dir / n for n in ("metrics.csv", "layers.csv", "eval.csv")) if not _readable_csv(p)),
               run_dir / "metrics.csv")
    return (f"The training log {bad} is damaged ({type(e).__name__}); fix or delete it (the resumed run then logs "
            f"only its own steps), or pass --overwrite to start the run over.")


def _readable_csv(path: Path) -> bool:
    if not path.is_file():
        return True
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return all(int(float(r["step"])) >= 0 for r in csv.DictReader(f))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, csv.Error):
        return False


def _save_final(acc, model, unwrapped, tokenizer, run_dir: Path) -> None:
    state_dict = acc.get_state_dict(model)
    if acc.is_main_process:
        unwrapped.save_pretrained(str(run_dir), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(run_dir))
    acc.wait_for_everyone()


@torch.no_grad()
def _evaluate(run: Run, cfg: TrainConfig, tokenizer, tele: Telemetry, step: int) -> None:
    """Mean loss parts over a fixed set of val.jsonl batches (same batches every time)."""
    rows = load_rows(cfg.data.dir, "val")
    if not rows:
        return
    try:
        pools, ids = encode_pools(tokenizer, rows, list(run.method.needs()), cfg.data)
    except RepbendError as e:  # a small val part may lack a split: skip evaluation, keep training
        tqdm.write(f"repbend: skipping evaluation at step {step}: {e}")
        return
    sampler = StepSampler(pools, cfg.data.batch_size, seed=12345, rank=run.acc.process_index, world=run.acc.num_processes,
                          paired_refusals=cfg.data.paired_refusals, ids=ids)
    sums: dict[str, float] = defaultdict(float)
    for _ in range(cfg.training.eval_batches):
        loss, parts, _ = run.loss(sampler.next(), 1.0)
        for k, v in {"loss/total": float(loss), **parts}.items():
            sums["val/" + k.removeprefix("loss/")] += v / cfg.training.eval_batches
    tele.log("eval", step, _mean_across(run.acc, dict(sums)))
