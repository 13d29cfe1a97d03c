"""Side-by-side summary of several evaluated runs, with mean ± std over training seeds.

Input: ``{label: [eval folder, ...]}`` (one folder per seed; the original model has one). Output in
``out_dir``: ``summary.json`` (every number, per seed and aggregated), ``summary.md`` (the tables),
``asr_by_attack.png`` (grouped bars with std error bars), ``asr_vs_capability.png`` and
``asr_vs_overrefusal.png`` (Pareto views).
"""
from __future__ import annotations

import json
from pathlib import Path
from statistics import mean, pstdev

from repbend.errors import RepbendError
from repbend.evaluation.results import RESULTS_FILE, Results
from repbend.io import atomic_write_json, atomic_write_text


def _load(run: Path) -> Results:
    if not (Path(run) / RESULTS_FILE).is_file():
        raise RepbendError(f"{run} has no results.json; evaluate it first (repbend eval ... --output-dir {run}).")
    return Results.load(run)


def _attack_rate(res: Results, key: str) -> dict[str, float]:
    """Per attack: ``key`` (asr, gibberish, refusal) averaged over its benchmarks (attacks without a value left out)."""
    return {a: v for a, v in res.attack_rate(key).items() if v is not None}


# The attacks the core-ASR target averages (the paper's headline set): direct request, prefilling,
# template jailbreaks, input-embedding and GCG; matched by label prefix (embedding_paper counts).
CORE_ATTACKS = ("direct", "prefill", "templates", "embedding", "gcg")


def core_average(per_attack: dict[str, float]) -> float | None:
    """Mean ASR over the core attacks present (one value per core family; the first label that matches)."""
    vals = []
    for fam in CORE_ATTACKS:
        hit = next((v for k, v in sorted(per_attack.items()) if k == fam or
                    (k.startswith(fam + "_") and not k.startswith("gcg_transfer"))), None)
        if hit is not None:
            vals.append(hit)
    return mean(vals) if vals else None


def _flat(res: Results) -> dict[str, float]:
    """Every headline number of one run as ``name -> value``."""
    per_attack = _attack_rate(res, "asr")
    row = {f"asr/{k}": v for k, v in per_attack.items()}
    core = core_average(per_attack)
    if core is not None:
        row["core_asr"] = core
    row.update({f"gibberish/{k}": v for k, v in _attack_rate(res, "gibberish").items()})
    row.update({f"refusal/{k}": v for k, v in _attack_rate(res, "refusal").items()})
    if res.average_asr is not None:
        row["average_asr"] = res.average_asr
    if res.over_refusal.compliance is not None:
        row["over_refusal/compliance"] = res.over_refusal.compliance
    held_out = res.set_rates("overrefusal")
    for k in ("refusal", "gibberish"):      # reported by the default-judge measure
        if getattr(held_out, k) is not None:
            row[f"over_refusal/{k}"] = getattr(held_out, k)
    row.update({f"capability/{k}": v for k, v in res.capability_numbers().items()})
    return row


def aggregate(runs: dict[str, list[Path]]) -> dict:
    """``{label: {"seeds": [...flat rows], "mean": {...}, "std": {...}, "judge": name}}``."""
    out = {}
    for label, folders in runs.items():
        results = [_load(f) for f in folders]
        rows = [_flat(r) for r in results]
        keys = sorted(set().union(*rows)) if rows else []
        out[label] = {
            "runs": [str(f) for f in folders],
            "seeds": rows,
            "mean": {k: mean(r[k] for r in rows if k in r) for k in keys},
            "std": {k: pstdev([r[k] for r in rows if k in r]) for k in keys},
            "judge": results[0].judge_name if results else None,
        }
    return out


def _fmt(m: float | None, s: float | None, pct: bool = True, digits: int = 1) -> str:
    if m is None:
        return "–"
    scale = 100 if pct else 1
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}" if s else f"{m * scale:.{digits}f}"


def to_markdown(agg: dict) -> str:
    labels = list(agg)
    attacks = sorted({k.split("/", 1)[1] for a in agg.values() for k in a["mean"] if k.startswith("asr/")})
    judge = next((a["judge"] for a in agg.values() if a["judge"]), "?")
    n_seeds = {lab: len(a["seeds"]) for lab, a in agg.items()}
    lines = [f"ASR % (lower is better), judge `{judge}`; mean ± std over seeds "
             f"({', '.join(f'{k}: {v}' for k, v in n_seeds.items())}).", "",
             "| attack | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for att in attacks:
        lines.append(f"| {att} | " + " | ".join(_fmt(agg[l]["mean"].get(f"asr/{att}"), agg[l]["std"].get(f"asr/{att}"))
                                                 for l in labels) + " |")
    lines.append("| **average** | " + " | ".join(f"**{_fmt(agg[l]['mean'].get('average_asr'), agg[l]['std'].get('average_asr'))}**"
                                                  for l in labels) + " |")
    if any("core_asr" in agg[l]["mean"] for l in labels):
        lines.append(f"| **core average** ({', '.join(CORE_ATTACKS)}) | " + " | ".join(
            f"**{_fmt(agg[l]['mean'].get('core_asr'), agg[l]['std'].get('core_asr'))}**" for l in labels) + " |")
    lines += ["", "Gibberish rate % on harmful prompts (not counted as attack success) and refusal rate %:", "",
              "| attack | " + " | ".join(f"{l} gibberish | {l} refusal" for l in labels) + " |",
              "|---|" + "---|---|" * len(labels)]
    for att in attacks:
        cells = []
        for l in labels:
            cells.append(_fmt(agg[l]["mean"].get(f"gibberish/{att}"), agg[l]["std"].get(f"gibberish/{att}")))
            cells.append(_fmt(agg[l]["mean"].get(f"refusal/{att}"), agg[l]["std"].get(f"refusal/{att}")))
        lines.append(f"| {att} | " + " | ".join(cells) + " |")
    other = sorted({k for a in agg.values() for k in a["mean"] if k.startswith(("over_refusal/", "capability/"))})
    if other:
        lines += ["", "Over-refusal compliance % (higher is better) and capability:", "",
                  "| metric | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for k in other:
            pct = not any(t in k for t in ("kl", "perplexity", "ppl", "seconds"))
            digits = 3 if "kl" in k else (2 if not pct else 1)     # a benign KL of 0.026 must not print as 0.0
            lines.append(f"| {k} | " + " | ".join(_fmt(agg[l]["mean"].get(k), agg[l]["std"].get(k), pct, digits)
                                                  for l in labels) + " |")
        lines += ["", "(capability values that are fractions are shown in %, KL/perplexity as they are)"]
    return "\n".join(lines) + "\n"


def plot(agg: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(agg)
    attacks = sorted({k.split("/", 1)[1] for a in agg.values() for k in a["mean"] if k.startswith("asr/")})
    paths = []
    if attacks:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(attacks) + 2), 4))
        width = 0.8 / len(labels)
        x = np.arange(len(attacks))
        for i, lab in enumerate(labels):
            m = [100 * agg[lab]["mean"].get(f"asr/{a}", np.nan) for a in attacks]
            s = [100 * agg[lab]["std"].get(f"asr/{a}", 0.0) for a in attacks]
            ax.bar(x + i * width - 0.4 + width / 2, m, width, yerr=s, capsize=2, label=lab)
        ax.set_xticks(x, attacks, rotation=30, ha="right")
        ax.set_ylabel("attack success rate (%)")
        ax.set_ylim(0, 100)
        ax.set_title("ASR per attack (mean ± std over seeds)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out_dir / "asr_by_attack.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    cap_keys = sorted({k for a in agg.values() for k in a["mean"] if k.startswith("capability/mmlu")})
    # Pareto views: ASR against capability (MMLU) and against over-refusal compliance (on a small model
    # MMLU sits at chance, and the helpfulness cost of a defence shows in over-refusal instead)
    views = ([(cap_keys[0], cap_keys[0].split("/", 1)[1], "Safety vs capability", "asr_vs_capability.png")]
             if cap_keys else [])
    views.append(("over_refusal/compliance", "over-refusal compliance", "Safety vs over-refusal", "asr_vs_overrefusal.png"))
    for key, xname, title, fname in views:
        points = [lab for lab in labels if key in agg[lab]["mean"] and "average_asr" in agg[lab]["mean"]]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(5, 4))
        for lab in points:
            mm, ss = agg[lab]["mean"], agg[lab]["std"]
            ax.errorbar(100 * mm[key], 100 * mm["average_asr"], xerr=100 * ss.get(key, 0),
                        yerr=100 * ss.get("average_asr", 0), fmt="o", capsize=3, label=lab)
        ax.set_xlabel(f"{xname} (%) — higher is better")
        ax.set_ylabel("average ASR (%) — lower is better")
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out_dir / fname
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


def generation_speed(runs: dict[str, list[Path]], data_dir: str | Path | None = None) -> dict[str, dict]:
    """Generation throughput per stage: the data build's answers and every evaluation (``meta.generation``)."""
    out: dict[str, dict] = {}
    man = Path(data_dir) / "manifest.json" if data_dir else None
    if man is not None and man.is_file():
        try:
            m = json.loads(man.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):   # a damaged manifest only costs the build's speed row
            m = {}
        t = m.get("timings") or {}
        n = (m.get("outputs") or {}).get("generations.jsonl", {}).get("rows")
        secs = t.get("generate_s_all_sessions") or t.get("generate_s")
        out["build data"] = {"requests": n, "seconds": secs,
                             "requests_per_s": round(n / secs, 2) if n and secs else None, "tokens_per_s": None}
    for label, folders in runs.items():
        for f in folders:
            if not (Path(f) / RESULTS_FILE).is_file():
                continue
            g = Results.load(f).meta.generation or {}
            secs = g.get("seconds")
            out[f"evaluate {Path(f).name}"] = {"requests": g.get("generated"), "seconds": secs,
                                               "requests_per_s": round(g["generated"] / secs, 2)
                                               if secs and g.get("generated") else None,
                                               "tokens_per_s": g.get("tokens_per_s")}
    return out


def _analysis_links(folders: list[Path], out: Path) -> str:
    """Markdown that links each trained model's representation analysis and shows its bending plot."""
    import os

    md = ""
    for d in folders:
        if not (Path(d) / "summary.md").is_file():
            continue
        rel = Path(os.path.relpath(d, out))
        md += f"\nRepresentation analysis of `{Path(d).name}`: [{rel / 'summary.md'}]({rel / 'summary.md'})\n"
        md += "".join(f"\n![{p}]({rel / p})\n" for p in ("bending.png", "separability.png") if (Path(d) / p).is_file())
    return md


def summarise(runs: dict[str, list[Path]], out_dir: str | Path, timings: dict | None = None,
              data_dir: str | Path | None = None, analyses: list[Path] | None = None,
              machine: dict | None = None) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(runs)
    md = "# repbend summary\n\n" + to_markdown(agg)
    speed = generation_speed(runs, data_dir)
    if timings:
        md += "\nWall time per stage (s):\n\n| stage | seconds |\n|---|---|\n" + "".join(
            f"| {k} | {v:.0f} |\n" for k, v in timings.items())
        md += f"| **total** | **{sum(timings.values()):.0f}** |\n"
        if machine:
            from repbend.machine import describe

            md += f"\nMachine: {describe(machine)}.\n"
    if speed:
        dash = lambda v, f="{:.1f}": "–" if v is None else f.format(v)  # noqa: E731
        md += ("\nGeneration (this run and the runs it resumed for the build; this run for evaluations):\n\n"
               "| stage | requests | seconds generating | requests/s | new tokens/s |\n|---|---|---|---|---|\n" +
               "".join(f"| {k} | {dash(v['requests'], '{}')} | {dash(v['seconds'], '{:.0f}')} | "
                       f"{dash(v['requests_per_s'], '{:.2f}')} | {dash(v['tokens_per_s'])} |\n"
                       for k, v in speed.items()))
    plots = plot(agg, out)
    md += "".join(f"\n![{p.stem}]({p.name})\n" for p in plots)
    md += _analysis_links(analyses or [], out)
    atomic_write_json(out / "summary.json", {"runs": agg, "timings": timings or {}, "generation": speed,
                                             "machine": machine or {}})
    atomic_write_text(out / "summary.md", md)
    return {"runs": agg, "timings": timings or {}, "generation": speed, "machine": machine or {}, "markdown": md}
