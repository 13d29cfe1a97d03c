"""Plot a tuning ledger: validation ASR against held-out over-refusal compliance, one point per trial.

    python tools/plot_tuning_ledger.py docs/tuning_trials.csv docs/tuning_trials.png

A sweep's own records (``trials.jsonl``, ``tuning.png``) live in its run folder; a ledger is the CSV copy
of the results worth keeping in the repository, one row per trial and seed, with the columns

    family,trial,finetune,seeds,mean_asr,overrefusal

``family`` groups trials by the knob they turn (one colour each); ``finetune`` is ``lora`` or ``full``
(marker shape; anything else is drawn as a square); ``seeds`` is a seed number or ``mean`` (a mean over
seeds, drawn larger and hollow). One row has the trial ``original``: its over-refusal compliance minus 5
points is the selection rule's limit (dashed line) and a tenth of its ASR the 90% target (dotted line).
Rows of the family ``chosen`` are the selected config: the spread of its per-seed ASR is drawn as a grey
band, since a single-seed point inside it cannot be told apart from the chosen config.

An optional column ``rerun`` (``yes``/``no``) says whether the trial can still be re-run from its sweep file:
``no`` marks a trial whose option was removed from repbend, kept in the ledger as a measured result. The
plot draws every row alike and ignores that column.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLUMNS = ("family", "trial", "finetune", "seeds", "mean_asr", "overrefusal")
MARKERS = {"lora": "o", "full": "^"}


def read_ledger(ledger: Path) -> list[dict]:
    """The ledger's rows; a one-line error when it is empty, lacks a column or has no original."""
    rows = list(csv.DictReader(ledger.open()))
    if not rows:
        raise SystemExit(f"error: {ledger} has no rows; the header is {','.join(COLUMNS)}")
    missing = set(COLUMNS) - set(rows[0])
    if missing:
        raise SystemExit(f"error: {ledger} lacks the column(s) {', '.join(sorted(missing))}; "
                         f"the header is {','.join(COLUMNS)}")
    if not any(r["trial"] == "original" for r in rows):
        raise SystemExit(f"error: {ledger} has no 'original' row; add the original model's validation numbers")
    return rows


def main(ledger: Path, png: Path) -> None:
    rows = read_ledger(ledger)
    orig = next(r for r in rows if r["trial"] == "original")
    families = list(dict.fromkeys(r["family"] for r in rows if r["trial"] != "original"))
    cmap = plt.get_cmap("tab10")
    colour = {f: ("black" if f == "chosen" else cmap(i % 10)) for i, f in enumerate(families)}
    fig, ax = plt.subplots(figsize=(13, 6.5))
    chosen_seeds = [float(r["mean_asr"]) for r in rows if r["family"] == "chosen" and r["seeds"] != "mean"]
    if len(chosen_seeds) > 1:
        ax.axhspan(min(chosen_seeds), max(chosen_seeds), color="0.9", zorder=0,
                   label=f"chosen config, spread over seeds ({min(chosen_seeds):.1f}-{max(chosen_seeds):.1f})")
    ax.axvline(float(orig["overrefusal"]) - 5, color="tab:red", ls="--", lw=1, label="over-refusal limit (original - 5)")
    ax.axhline(0.1 * float(orig["mean_asr"]), color="tab:purple", ls=":", lw=1, label="target: 90% below the original")
    for r in rows:
        x, y = float(r["overrefusal"]), float(r["mean_asr"])
        if r["trial"] == "original":
            ax.scatter(x, y, s=70, color="black", marker="s", label="original model")
            continue
        marker = "*" if r["family"] == "chosen" else MARKERS.get(r["finetune"], "s")
        if r["seeds"] == "mean":
            ax.scatter(x, y, s=140, facecolor="none", edgecolor=colour[r["family"]], lw=1.6, marker=marker,
                       label=f"{r['family']} (mean of seeds)")
        else:
            ax.scatter(x, y, s=45, color=colour[r["family"]], marker=marker, alpha=0.85, label=r["family"])
    for name, m in MARKERS.items():      # shape legend entries, drawn off-canvas
        ax.scatter([], [], color="0.5", marker=m, label=f"{'LoRA' if name == 'lora' else 'full fine-tuning'}")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_xlabel("held-out over-refusal compliance, % (validation)")
    ax.set_ylabel("mean ASR over direct, prefill, templates, embedding, GCG, % (validation)")
    ax.set_title("Tuning trials on SmolLM2-135M by family of knob (small: seed 0; hollow: mean of 3 seeds)",
                 fontsize=10)
    ax.set_ylim(0, 70)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    print(f"wrote {png} ({len(rows)} rows)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python tools/plot_tuning_ledger.py LEDGER.csv OUT.png")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
