"""Several runs side by side: ``compare.md``, ``compare.json``, ``compare_asr.png``, ``pareto.png``.

Runs are evaluated separately (``repbend eval``); this only reads their ``results.json``. Rows whose
judges differ are flagged, because ASRs from different judges are not comparable.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from repbend.errors import RepbendError
from repbend.evaluation.report import _num, _pct, _plt, _table
from repbend.evaluation.results import Results
from repbend.io import atomic_write_json, atomic_write_text


def pick_capability(runs: list[Results | dict]) -> str | None:
    """The capability metric shared by every run, preferring MMLU."""
    common = None
    for r in runs:
        keys = set(Results.coerce(r).capability_numbers())
        common = keys if common is None else common & keys
    if not common:
        return None
    return "mmlu" if "mmlu" in common else sorted(common)[0]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated by another (x lower is better, y higher is better)."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def summary_table(runs: list[Results], labels: list[str]) -> dict[str, Any]:
    attacks: list[str] = []
    for r in runs:
        attacks += [a for a in r.asr if a not in attacks]
    caps: list[str] = []
    for r in runs:
        caps += [k for k in r.capability if k not in caps]
    rows = {f"ASR {a}": [r.attack_rate("asr").get(a) for r in runs] for a in attacks}
    rows["ASR average"] = [r.average_asr for r in runs]
    rows["over-refusal compliance"] = [r.over_refusal.compliance for r in runs]
    for k in caps:
        rows[k] = [r.capability.get(k) for r in runs]
    return {"labels": labels, "judges": [r.judge_name for r in runs], "attacks": attacks, "capability": caps,
            "rows": rows}


def plot_grouped_asr(runs: list[Results], labels: list[str], attacks: list[str], path: Path) -> None:
    plt = _plt()
    width = 0.8 / max(1, len(runs))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(attacks) * max(1, len(runs)) ** 0.5 + 3), 4.2))
    for j, (r, lab) in enumerate(zip(runs, labels)):
        means = r.attack_rate("asr")
        xs = [i + (j - (len(runs) - 1) / 2) * width for i in range(len(attacks))]
        ys = [100 * (means.get(a) or 0) for a in attacks]
        ax.bar(xs, ys, width * 0.95, label=f"{lab} (judge {r.judge_name})")
    ax.set_xticks(range(len(attacks)))
    ax.set_xticklabels(attacks, rotation=30, ha="right")
    ax.set_ylabel("ASR % (mean over benchmarks)")
    ax.set_ylim(0, 105)
    ax.set_title("Attack success rate per attack (lower is safer)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pareto(runs: list[Results], labels: list[str], cap: str | None, path: Path) -> list[int]:
    """ASR vs capability scatter (capability = shared metric, else over-refusal compliance)."""
    plt = _plt()
    ylab = cap or "over-refusal compliance"
    pts, keep = [], []
    for i, r in enumerate(runs):
        x = r.average_asr
        y = r.capability.get(cap) if cap else r.over_refusal.compliance
        if x is not None and y is not None:
            pts.append((100 * x, y * (100 if ylab in ("mmlu", "gsm8k", "over-refusal compliance") else 1)))
            keep.append(i)
    front = [keep[k] for k in pareto_front(pts)] if pts else []
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for (x, y), i in zip(pts, keep):
        ax.scatter([x], [y], s=60, color="tab:red" if i in front else "tab:blue", zorder=3)
        ax.annotate(labels[i], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9)
    fpts = [pts[keep.index(i)] for i in front]
    if len(fpts) > 1:
        ax.plot([p[0] for p in fpts], [p[1] for p in fpts], color="tab:red", lw=1, ls="--", label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_xlabel("average ASR % (lower is safer)")
    ax.set_ylabel(f"{ylab}{' %' if ylab in ('mmlu', 'gsm8k', 'over-refusal compliance') else ''} (higher is better)")
    ax.set_title("Safety vs capability")
    if not pts:
        ax.text(0.5, 0.5, "no run has both numbers", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    ax.margins(x=0.2, y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return front


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path, labels: list[str] | None = None) -> Path:
    """Put several evaluation runs side by side; returns the path of compare.md."""
    if not run_dirs:
        raise RepbendError("compare_runs needs at least one run folder.")
    if labels is not None and len(labels) != len(run_dirs):
        raise RepbendError(f"got {len(labels)} labels for {len(run_dirs)} runs; pass one label per run.")
    runs = [Results.load(d) for d in run_dirs]
    labels = list(labels) if labels else [Path(d).name or str(d) for d in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = summary_table(runs, labels)
    cap = pick_capability(runs)
    plot_grouped_asr(runs, labels, table["attacks"], out / "compare_asr.png")
    front = plot_pareto(runs, labels, cap, out / "pareto.png")
    table["pareto_front"] = [labels[i] for i in front]
    table["runs"] = [str(d) for d in run_dirs]
    atomic_write_json(out / "compare.json", table)
    lines = ["# repbend: runs side by side", ""]
    if len(set(table["judges"])) > 1:
        lines += [f"**Warning: the runs used different judges ({', '.join(table['judges'])}); their ASRs are "
                  f"not comparable.**", ""]
    lines += ["ASR and compliance in %, lower ASR is safer. Judge per run: "
              + ", ".join(f"{lab}: {j}" for lab, j in zip(labels, table["judges"])), ""]
    body = []
    for name, vals in table["rows"].items():
        fmt = _pct if name.startswith("ASR") or name.startswith("over-refusal") else _num
        body.append([name] + [fmt(v) for v in vals])
    lines += [_table(["metric"] + labels, body), ""]
    lines += [f"Pareto front (average ASR vs {cap or 'over-refusal compliance'}): "
              + (", ".join(table["pareto_front"]) or "n/a"), "",
              "![ASR per attack](compare_asr.png)", "", "![ASR vs capability](pareto.png)", ""]
    lines += ["Runs: " + ", ".join(f"`{d}`" for d in table["runs"]), ""]
    atomic_write_text(out / "compare.md", "\n".join(lines))
    return out / "compare.md"
