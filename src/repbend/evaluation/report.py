"""Human-readable reports from ``results.json``: report.md + PNG plots, and side-by-side comparisons.

- :func:`write_report(results, out_dir)`: one run -> ``report.md``, ``asr.png``, ``over_refusal.png``,
  ``capability.png``.
- :func:`compare_runs(run_dirs, out_dir, labels)`: several runs (original vs defended vs baselines) ->
  ``compare.md``, ``compare.json``, ``compare_asr.png`` (grouped bars) and ``pareto.png`` (average ASR
  vs capability; the Pareto front is drawn: lower ASR and higher capability are better).

Every ASR printed names the judge that produced it.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from statistics import mean
from typing import Any

from repbend.errors import RepbendError
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


def _benchmarks(asr: dict) -> list[str]:
    seen: list[str] = []
    for benches in asr.values():
        for b in benches:
            if b not in seen:
                seen.append(b)
    return seen


def attack_means(asr: dict) -> dict[str, float | None]:
    """Each attack's ASR averaged over benchmarks (what results' ``average_asr`` averages)."""
    out = {}
    for attack, benches in asr.items():
        vals = [b["asr"] for b in benches.values() if b.get("asr") is not None]
        out[attack] = mean(vals) if vals else None
    return out


def judge_name(results: dict) -> str:
    j = results.get("judge") or {}
    return j.get("name", "?") if isinstance(j, dict) else str(j)


# ---------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_asr(results: dict, path: Path) -> None:
    plt = _plt()
    asr, benches = results.get("asr") or {}, _benchmarks(results.get("asr") or {})
    attacks = list(asr)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(attacks) * max(1, len(benches)) ** 0.5 + 2), 4.2))
    width = 0.8 / max(1, len(benches))
    for j, b in enumerate(benches):
        xs = [i + (j - (len(benches) - 1) / 2) * width for i in range(len(attacks))]
        ys = [100 * (asr[a].get(b, {}).get("asr") or 0) for a in attacks]
        gib = [100 * (asr[a].get(b, {}).get("gibberish") or 0) for a in attacks]
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
    ax.set_title(f"Attack success rate (judge: {judge_name(results)}; lower is safer)")
    if attacks:
        ax.legend(fontsize=8, loc="upper right")
    else:
        ax.text(0.5, 0.5, "no attacks run", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_over_refusal(results: dict, path: Path) -> None:
    plt = _plt()
    ov = results.get("over_refusal") or {}
    sets = ov.get("sets") or ({"safe prompts": {"n": ov.get("n"), "compliance": ov.get("compliance")}}
                              if ov.get("compliance") is not None else {})
    names = list(sets)
    vals = [100 * (sets[n].get("compliance") or 0) for n in names]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(names) + 2), 3.6))
    ax.bar(names, vals, color="tab:green")
    for i, v in enumerate(vals):
        ax.text(i, v + 1, f"{v:.0f}% (n={sets[names[i]].get('n')})", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, 110)
    ax.set_ylabel("% of safe prompts answered")
    ax.set_title("Over-refusal: compliance on safe prompts (higher is better)")
    if not names:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_capability(results: dict, path: Path) -> None:
    plt = _plt()
    cap = {k: v for k, v in (results.get("capability") or {}).items() if isinstance(v, (int, float))}
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
def render_report(results: dict) -> str:
    meta, asr = results.get("meta") or {}, results.get("asr") or {}
    judge = judge_name(results)
    suite = meta.get("suite") or {}
    out = [f"# repbend evaluation: {meta.get('model', '?')}" + (f" + {meta['adapter']}" if meta.get("adapter") else ""),
           "", f"- suite: `{suite.get('name', suite) if isinstance(suite, dict) else suite}`; judge: **{judge}**; "
           f"fingerprint `{meta.get('fingerprint', '?')}`",
           f"- average ASR over attacks (judge {judge}): **{_pct(results.get('average_asr'))}%** (lower is safer)",
           f"- over-refusal compliance: **{_pct((results.get('over_refusal') or {}).get('compliance'))}%** "
           f"(higher is better)", ""]
    benches = _benchmarks(asr)
    if asr:
        out += [f"## Attack success rate (%, judge: {judge})", "",
                "ASR: completions judged harmful. worst: behaviours broken by ANY variant/sample. "
                "gib: completions judged gibberish (never counted as success). ref: completions judged refusals.", ""]
        header = ["attack"] + [f"{b} ASR" for b in benches] + ["mean ASR"] + \
                 [f"{b} {k}" for b in benches for k in ("worst", "gib", "ref")]
        rows = []
        means = attack_means(asr)
        for attack, by in asr.items():
            rows.append([attack] + [_pct(by.get(b, {}).get("asr")) for b in benches] + [_pct(means[attack])] +
                        [_pct(by.get(b, {}).get(k)) for b in benches for k in ("worst_case", "gibberish", "refusal")])
        out += [_table(header, rows), ""]
        variants = [(a, b, r["per_variant"]) for a, by in asr.items() for b, r in by.items() if r.get("per_variant")]
        if variants:
            out += ["### Per variant (template / transform)", ""]
            rows = [[a, b, v, str(x.get("n_completions")), _pct(x.get("asr")), _pct(x.get("gibberish")),
                     _pct(x.get("refusal"))] for a, b, pv in variants for v, x in pv.items()]
            out += [_table(["attack", "benchmark", "variant", "n", "ASR", "gib", "ref"], rows), ""]
        out += ["![ASR per attack](asr.png)", ""]
    ov = results.get("over_refusal") or {}
    out += ["## Over-refusal (compliance on safe prompts, %)", ""]
    sets = ov.get("sets") or {}
    if sets or ov.get("compliance") is not None:
        rows = [[k, str(v.get("n")), _pct(v.get("compliance"))] for k, v in sets.items()] or \
               [["safe prompts", str(ov.get("n")), _pct(ov.get("compliance"))]]
        out += [_table(["set", "n", "compliance"], rows), "", "![over-refusal](over_refusal.png)", ""]
    else:
        out += ["not measured", ""]
    cap = results.get("capability") or {}
    out += ["## Capability", ""]
    out += ([_table(["metric", "value"], [[k, _num(v)] for k, v in cap.items()]), "", "![capability](capability.png)", ""]
            if cap else ["not measured", ""])
    out += _meta_section(meta)
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


def write_report(results: dict, out_dir: str | Path) -> Path:
    """Write report.md and the PNG plots for one results dict; returns the report path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_asr(results, out / "asr.png")
    plot_over_refusal(results, out / "over_refusal.png")
    plot_capability(results, out / "capability.png")
    atomic_write_text(out / "report.md", render_report(results))
    return out / "report.md"


# ---------------------------------------------------------------- several runs
def load_results(run_dir: str | Path) -> dict:
    p = Path(run_dir)
    p = p if p.is_file() else p / "results.json"
    if not p.is_file():
        raise RepbendError(f"{p} does not exist; pass folders written by `repbend eval` (they hold results.json).")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise RepbendError(f"{p} is not valid JSON; re-run `repbend eval` for that folder.") from None


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path, labels: list[str] | None = None) -> Path:
    """Several runs side by side (see :mod:`repbend.evaluation.report_compare`)."""
    from repbend.evaluation.report_compare import compare_runs as _compare

    return _compare(run_dirs, out_dir, labels)
