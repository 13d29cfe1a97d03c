"""Plot the seed-0 validation trials of tuning rounds 17-26 (docs/TUNING.md) from their ledger.

    python tools/plot_tuning_ledger.py docs/tuning_seed0_rounds17-26.csv docs/tuning_rounds17-26.png

Rounds 9-17 are drawn by tools/plot_tuning_rounds.py from the sweep's own records (runs/tune-v2/trials.jsonl).
Those records live in runs/, which a fresh machine does not keep, so from round 18 on each seed-0 result is
also written, as the sweep printed it, into a CSV ledger in docs/ (one row per trial, with the run and the
section of docs/TUNING.md it comes from); this script plots that ledger.

Mean ASR over the five core attacks against held-out over-refusal compliance, both on validation, one point
per trial, coloured by round; the over-refusal limit (the original's compliance - 5 points); and, as a grey
band, the spread of the default's mean ASR over its three training seeds (31.3 / 41.1 / 47.3, round 17): a
seed-0 point inside that band is not distinguishable from the default by one seed.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_SEEDS = (31.3, 41.1, 47.3)   # r17_full_lr5e-5, validation mean ASR of seeds 0 / 1 / 2 (docs/TUNING.md)


def main(ledger: Path, png: Path) -> None:
    rows = list(csv.DictReader(ledger.open()))
    if not rows:
        raise SystemExit(f"error: {ledger} has no rows; give the ledger CSV (round,trial,mean_asr,overrefusal,source)")
    missing = {"round", "trial", "mean_asr", "overrefusal"} - set(rows[0])
    if missing:
        raise SystemExit(f"error: {ledger} lacks the column(s) {', '.join(sorted(missing))}; "
                         "the header is round,trial,mean_asr,overrefusal,source")
    orig = next((r for r in rows if r["trial"] == "original"), None)
    if orig is None:
        raise SystemExit(f"error: {ledger} has no 'original' row; add the original model's validation numbers")
    rounds = sorted({int(r["round"]) for r in rows if r["trial"] != "original"})
    cmap = plt.get_cmap("tab10")
    colour = {rd: cmap(i % 10) for i, rd in enumerate(rounds)}
    fig, ax = plt.subplots(figsize=(10, 6.5))
    ax.axhspan(min(DEFAULT_SEEDS), max(DEFAULT_SEEDS), color="0.9", zorder=0,
               label="default's mean ASR over its 3 seeds (31.3-47.3)")
    ax.axvline(float(orig["overrefusal"]) - 5, color="tab:red", ls="--", lw=1, label="over-refusal limit (original - 5)")
    ax.axhline(0.1 * float(orig["mean_asr"]), color="tab:purple", ls=":", lw=1, label="target: 90% below the original")
    placed: list[tuple[float, float]] = []
    for r in rows:
        x, y = float(r["overrefusal"]), float(r["mean_asr"])
        crowded = sum(abs(x - px) < 4 and abs(y - py) < 1.5 for px, py in placed)   # labels already there: go below
        placed.append((x, y))
        if r["trial"] == "original":
            ax.scatter(x, y, s=60, color="black", marker="s", label="original")
        else:
            rd = int(r["round"])
            ax.scatter(x, y, s=45, color=colour[rd], edgecolor="black" if "default" in r["trial"] else "none",
                       label=f"round {rd}")
        ax.annotate(r["trial"].replace(" (default)", "*"), (x, y), fontsize=7, xytext=(4, 3 - 10 * crowded),
                    textcoords="offset points")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))            # one legend entry per round
    ax.legend(uniq.values(), uniq.keys(), fontsize=8, loc="lower left", ncol=2)
    ax.set_xlabel("held-out over-refusal compliance, % (validation, 48 prompts, seed 0)")
    ax.set_ylabel("mean ASR over direct, prefill, templates, embedding, GCG, % (validation, seed 0)")
    ax.set_title("Tuning rounds 17-26 on SmolLM2-135M (full fine-tuning, CPU); * = the default", fontsize=10)
    ax.set_ylim(0, 70)
    ax.set_xlim(right=106)          # room for the labels of the points at 100%
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png} ({len(rows)} trials)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python tools/plot_tuning_ledger.py LEDGER.csv OUT.png")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
