"""The analysis figures (matplotlib, Agg backend; imported only when plots are written)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"harmful": "tab:red", "overrefusal": "tab:orange", "benign": "tab:blue"}
LABELS = {"harmful": "harmful (HarmBench test)", "overrefusal": "over-refusal-like (held-out eval)",
          "benign": "benign (project set)"}


def _short(spec: str | None, n: int = 48) -> str:
    s = str(spec or "")
    return s if len(s) <= n else "..." + s[-(n - 3):]


def separability(summary: dict, path: Path) -> None:
    """AUROC and share caught at 5% FPR per hidden state: harmful vs over-refusal-like (and vs benign)."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for tag, style in (("original", "-"), ("trained", "--")):
        rows = summary["separability"].get(tag)
        if not rows:
            continue
        x = [r["layer"] for r in rows]
        for read, color in (("diff_means", "k"), ("probe", "tab:green")):
            if read not in rows[0]:
                continue
            name = "difference of means" if read == "diff_means" else "logistic probe"
            a1.plot(x, [r[read]["overrefusal"]["auroc"] for r in rows], style, color=color, lw=1.2,
                    label=f"{tag}, {name}, vs over-refusal-like")
            a1.plot(x, [r[read]["benign"]["auroc"] for r in rows], style, color=color, lw=0.6, alpha=0.5,
                    label=f"{tag}, {name}, vs benign")
            a2.plot(x, [100 * r[read]["overrefusal"]["caught_at_5pct"] for r in rows], style, color=color, lw=1.2,
                    label=f"{tag}, {name}")
    a1.set(xlabel="hidden state", ylabel="AUROC (test prompts)", ylim=(0.4, 1.01),
           title="harmful vs safe requests")
    a2.set(xlabel="hidden state", ylabel="% harmful caught", ylim=(0, 101),
           title=f"caught with <= {100 * summary['max_fpr']:.0f}% of over-refusal-like flagged")
    a1.legend(fontsize=6)
    a2.legend(fontsize=6)
    fig.suptitle(f"Linear read-outs at the answer's first position: {_short(summary['model'])}"
                 + (f" vs {_short(summary['trained'])}" if summary.get("trained") else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bending(summary: dict, path: Path) -> None:
    """Relative distance and cosine of trained vs original states, per kind and hidden state."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = summary["layers"]
    for kind, vals in summary["bending"].items():
        a1.plot(x, vals["relative"], color=COLORS[kind], label=LABELS[kind])
        a2.plot(x, vals["cosine"], color=COLORS[kind], label=LABELS[kind])
    a1.set(xlabel="hidden state", ylabel="mean ||trained - original|| / ||original||", title="how far states moved")
    a2.set(xlabel="hidden state", ylabel="mean cosine(trained, original)", title="direction kept")
    a1.legend(fontsize=7)
    fig.suptitle(f"Bending on unseen prompts: {_short(summary['trained'], 70)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pca(points: dict[str, dict[str, "object"]], explained: list[float], layer: int, title: str, path: Path) -> None:
    """Scatter of 2-D PCA coordinates ``points[tag][kind] -> (N, 2)``; original filled, trained hollow."""
    fig, ax = plt.subplots(figsize=(5.4, 4.4))
    for tag, by_kind in points.items():
        for kind, xy in by_kind.items():
            face = COLORS[kind] if tag == "original" else "none"
            ax.scatter(xy[:, 0], xy[:, 1], s=14, facecolors=face, edgecolors=COLORS[kind], linewidths=0.8,
                       marker="o" if tag == "original" else "^", label=f"{tag}: {LABELS[kind]}")
    ax.set(xlabel=f"PC1 ({100 * explained[0]:.0f}% of variance)", ylabel=f"PC2 ({100 * explained[1]:.0f}%)",
           title=f"hidden state {layer}: {title}")
    ax.title.set_fontsize(8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
