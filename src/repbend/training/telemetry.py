"""Training telemetry: CSV files (metrics, layer stats, eval), TensorBoard scalars and a loss-curve PNG.

Files in the run folder:
- ``metrics.csv``: one row per logged step: ``step, lr, loss/total, loss/<part>..., grad_norm, tokens,
  step_seconds, tokens_per_second`` (every loss part averaged over processes).
- ``layers.csv``: every ``layer_stats_every`` steps, for the safe and unsafe rows of that step's batch:
  ``step, split, layer, l2, cosine, ref_norm`` = per hidden-state mean ||policy - reference||, mean
  cosine(policy, reference) and mean ||reference|| over the response tokens — watch the unsafe
  rows' l2 grow and cosine fall on the target layers while the safe rows stay near 0 / 1.
- ``eval.csv``: ``step, val/<part>...`` when ``eval_every`` > 0 and the data has val.jsonl.
- ``tb/``: the same scalars for TensorBoard; ``loss.png``: every loss part against the step.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Iterable

import torch

from repbend.methods.base import SeqBatch, States


class CsvLog:
    """Append rows to a CSV; the header grows (file rewritten) if a later row brings a new column."""

    def __init__(self, path: Path):
        self.path = path
        self.columns: list[str] = []
        if path.is_file():
            with path.open(newline="") as f:
                self.columns = next(csv.reader(f), [])

    def append(self, row: dict) -> None:
        new = [k for k in row if k not in self.columns]
        if new:
            old = self.read()
            self.columns += new
            with self.path.open("w", newline="") as f:
                w = csv.DictWriter(f, self.columns)
                w.writeheader()
                w.writerows(old)
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (used on resume: they will be produced again)."""
        rows = [r for r in self.read() if int(float(r["step"])) <= step]
        if self.columns:
            with self.path.open("w", newline="") as f:
                w = csv.DictWriter(f, self.columns)
                w.writeheader()
                w.writerows(rows)


class Telemetry:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.metrics = CsvLog(run_dir / "metrics.csv")
        self.layers = CsvLog(run_dir / "layers.csv")
        self.eval = CsvLog(run_dir / "eval.csv")
        self.run_dir = run_dir
        self._tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # tensorboard is optional for the CSV/PNG telemetry
                self._tb = None

    def truncate_after(self, step: int) -> None:
        if self.enabled:
            for log in (self.metrics, self.layers, self.eval):
                log.truncate_after(step)

    def log(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        getattr(self, kind).append({"step": step, **values})
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k if kind != "layers" else f"layers/{k}", v, step)

    def log_layers(self, step: int, rows: Iterable[dict]) -> None:
        if not self.enabled:
            return
        for r in rows:
            self.layers.append({"step": step, **r})
            if self._tb is not None:
                self._tb.add_scalar(f"layers/{r['split']}/l2/{r['layer']:02d}", r["l2"], step)
                self._tb.add_scalar(f"layers/{r['split']}/cosine/{r['layer']:02d}", r["cosine"], step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()

    def plot(self) -> Path | None:
        """Write loss.png (one panel per loss part) from metrics.csv; returns its path."""
        rows = self.metrics.read()
        if not self.enabled or not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [k for k in self.metrics.columns if k.startswith("loss/")]
        fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
        steps = [int(float(r["step"])) for r in rows]
        for ax, k in zip(axes[:, 0], keys):
            ax.plot(steps, [float(r[k]) if r.get(k) not in (None, "") else math.nan for r in rows])
            ax.set_ylabel(k.removeprefix("loss/"))
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.suptitle("training loss parts")
        fig.tight_layout()
        out = self.run_dir / "loss.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out


def layer_stats(batch: SeqBatch, policy: States, reference: States) -> list[dict]:
    """Per hidden state: mean L2, mean cosine and mean reference norm over response tokens (else all tokens)."""
    mask = batch.response_mask.bool() & batch.attention_mask.bool()
    if not mask.any():
        mask = batch.attention_mask.bool()
    out = []
    for layer in sorted(policy.hidden):
        p, r = policy.hidden[layer][mask].float(), reference.hidden[layer][mask].float()
        out.append({"layer": layer, "l2": (p - r).norm(dim=-1).mean().item(),
                    "cosine": torch.cosine_similarity(p, r, dim=-1).mean().item(),
                    "ref_norm": r.norm(dim=-1).mean().item()})
    return out
