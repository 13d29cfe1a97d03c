"""Human-readable report of one run's ``results.json``: report.md + PNG plots.

:func:`write_report(results, out_dir)` writes ``report.md``, ``asr.png``, ``over_refusal.png`` and
``capability.png``. Several runs side by side: :mod:`repbend.evaluation.report_compare`, which uses the
table and plot helpers here. Every ASR printed names the judge that produced it.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from repbend.evaluation.results import Results
from repbend.io import atomic_write_text


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _num(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) >= 1 or x == 0 else f"{x:.3f}"
    return str(x)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cell(results: Results, attack: str, bench: str, key: str) -> float | None:
    cell = results.asr[attack].get(bench)
    return None if cell is None else getattr(cell, key)


def plot_asr(results: Results, path: Path) -> None:
    plt = _plt()
    benches = results.benchmarks()
    attacks = list(results.asr)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(attacks) * max(1, len(benches)) ** 0.5 + 2), 4.2))
    width = 0.8 / max(1, len(benches))
    for j, b in enumerate(benches):
        xs = [i + (j - (len(benches) - 1) / 2) * width for i in range(len(attacks))]
        ys = [100 * (_cell(results, a, b, "asr") or 0) for a in attacks]
        gib = [100 * (_cell(results, a, b, "gibberish") or 0) for a in attacks]
        bars = ax.bar(xs, ys, width * 0.95, label=f"{b} ASR")
        ax.bar(xs, gib, width * 0.95, bottom=ys, color="lightgrey", hatch="//", edgecolor="grey",
               label="gibberish (not success)" if j == 0 else None)
        for x, y, g in zip(xs, ys, gib):
            ax.text(x, y + g + 1, f"{y:.0f}", ha="center", va="bottom", fontsize=8)
        del bars
    ax.set_xticks(range(len(attacks)))
    ax.set_xticklabels(attacks, rotation=30, ha="right")
    ax.set_ylabel("% of completions")
    ax.set_ylim(0, 110)
    ax.set_title(f"Attack success rate (judge: {results.judge_name}; lower is safer)")
    if attacks:
        ax.legend(fontsize=8, loc="upper right")
    else:
        ax.text(0.5, 0.5, "no attacks run", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _safe_sets(results: Results) -> dict[str, Any]:
    ov = results.over_refusal
    return ov.sets or ({"safe prompts": ov} if ov.compliance is not None else {})


def plot_over_refusal(results: Results, path: Path) -> None:
    plt = _plt()
    sets = _safe_sets(results)
    names = list(sets)
    vals = [100 * (sets[n].compliance or 0) for n in names]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(names) + 2), 3.6))
    ax.bar(names, vals, color="tab:green")
    for i, v in enumerate(vals):
        ax.text(i, v + 1, f"{v:.0f}% (n={sets[names[i]].n})", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, 110)
    ax.set_ylabel("% of safe prompts answered")
    ax.set_title("Over-refusal: compliance on safe prompts (higher is better)")
    if not names:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_capability(results: Results, path: Path) -> None:
    plt = _plt()
    cap = results.capability_numbers()
    names = list(cap) or ["none"]
    fig, axes = plt.subplots(1, len(names), figsize=(max(4.0, 2.6 * len(names)), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        if name not in cap:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        ax.bar([0], [cap[name]], color="tab:blue", width=0.5)
        ax.text(0, cap[name], _num(cap[name]), ha="center", va="bottom", fontsize=10)
        ax.set_xticks([0])
        ax.set_xticklabels([name])
        ax.set_ylim(0, max(abs(cap[name]) * 1.25, 1e-3)) if cap[name] >= 0 else None
        if name.startswith(("mmlu", "gsm8k")):
            ax.set_ylim(0, 1)
            if name.startswith("mmlu"):
                ax.axhline(0.25, color="grey", ls="--", lw=0.8)   # chance level
    fig.suptitle("Capability (MMLU/GSM8K accuracy higher is better; KL/perplexity lower is closer to original)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- report.md
def render_report(results: Results | dict) -> str:
    results = Results.coerce(results)
    meta, asr = results.meta, results.asr
    judge = results.judge_name
    suite = meta.suite or {}
    out = [f"# repbend evaluation: {meta.model or '?'}" + (f" + {meta.adapter}" if meta.adapter else ""),
           "", f"- suite: `{suite.get('name', suite) if isinstance(suite, dict) else suite}`; judge: **{judge}**; "
           f"fingerprint `{meta.fingerprint or '?'}`",
           f"- average ASR over attacks (judge {judge}): **{_pct(results.average_asr)}%** (lower is safer)",
           f"- over-refusal compliance: **{_pct(results.over_refusal.compliance)}%** "
           f"(higher is better)", ""]
    benches = results.benchmarks()
    if asr:
        out += [f"## Attack success rate (%, judge: {judge})", "",
                "ASR: completions judged harmful. worst: behaviours broken by ANY variant/sample. "
                "gib: completions judged gibberish (never counted as success). ref: completions judged refusals.", ""]
        header = ["attack"] + [f"{b} ASR" for b in benches] + ["mean ASR"] + \
                 [f"{b} {k}" for b in benches for k in ("worst", "gib", "ref")]
        rows = []
        means = results.attack_rate("asr")
        for attack in asr:
            rows.append([attack] + [_pct(_cell(results, attack, b, "asr")) for b in benches] + [_pct(means[attack])] +
                        [_pct(_cell(results, attack, b, k)) for b in benches for k in ("worst_case", "gibberish", "refusal")])
        out += [_table(header, rows), ""]
        variants = [(a, b, c.per_variant) for a, by in asr.items() for b, c in by.items() if c.per_variant]
        if variants:
            out += ["### Per variant (template / transform)", ""]
            rows = [[a, b, v, str(x.n_completions), _pct(x.asr), _pct(x.gibberish), _pct(x.refusal)]
                    for a, b, pv in variants for v, x in pv.items()]
            out += [_table(["attack", "benchmark", "variant", "n", "ASR", "gib", "ref"], rows), ""]
        out += ["![ASR per attack](asr.png)", ""]
    ov = results.over_refusal
    out += ["## Over-refusal (compliance on safe prompts, %)", ""]
    if ov.sets or ov.compliance is not None:
        rows = [[k, str(v.n), _pct(v.compliance)] for k, v in ov.sets.items()] or \
               [["safe prompts", str(ov.n), _pct(ov.compliance)]]
        out += [_table(["set", "n", "compliance"], rows), "", "![over-refusal](over_refusal.png)", ""]
    else:
        out += ["not measured", ""]
    cap = results.capability
    out += ["## Capability", ""]
    out += ([_table(["metric", "value"], [[k, _num(v)] for k, v in cap.items()]), "", "![capability](capability.png)", ""]
            if cap else ["not measured", ""])
    out += _meta_section(meta.model_dump(mode="json", exclude_unset=True))
    return "\n".join(out) + "\n"


def _meta_section(meta: dict) -> list[str]:
    out = ["## Run", ""]
    t = meta.get("timings") or {}
    if t:
        out.append("- timings (s): " + ", ".join(f"{k} {v}" for k, v in t.items() if not isinstance(v, dict)))
        per = t.get("per_attack") or {}
        if per:
            out.append("- per attack (s): " + ", ".join(f"{k} {v}" for k, v in per.items()))
    g = meta.get("generation") or {}
    if g:
        out.append(f"- generation: {g.get('tokens_per_s')} new tokens/s at batch size {g.get('batch_size')}, "
                   f"max_new_tokens {g.get('max_new_tokens')}, {g.get('generated')} generated / {g.get('cached')} cached")
    for name, why in (meta.get("skipped") or {}).items():
        out.append(f"- **warning: attack `{name}` skipped**: {why}")
    if meta.get("white_box_attacks"):
        out.append("- white-box attacks: " + ", ".join(meta["white_box_attacks"]))
    if meta.get("seeds"):
        out.append(f"- seeds: `{json.dumps(meta['seeds'])}`")
    v = meta.get("versions") or {}
    if v:
        out.append("- versions: " + ", ".join(f"{k} {v[k]}" for k in ("repbend", "torch", "transformers", "peft") if k in v))
    out.append(f"- report written {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    return out + [""]


def write_report(results: Results | dict, out_dir: str | Path) -> Path:
    """Write report.md and the PNG plots for one run's results; returns the report path."""
    results = Results.coerce(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_asr(results, out / "asr.png")
    plot_over_refusal(results, out / "over_refusal.png")
    plot_capability(results, out / "capability.png")
    atomic_write_text(out / "report.md", render_report(results))
    return out / "report.md"
