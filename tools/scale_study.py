"""One table and one plot of RepBend's effect per model size, from finished evaluation folders.

    python tools/scale_study.py STUDY.yaml -o OUT

STUDY.yaml lists the models, smallest first, each with its original's evaluation folder and one
evaluation folder per trained seed (all judged by the same suite and judge)::

    models:
      - {name: SmolLM2-135M-Instruct, params_b: 0.135, original: runs/a/eval-original,
         repbend: [runs/a/eval-repbend-s0, runs/a/eval-repbend-s1, runs/a/eval-repbend-s2]}

Writes OUT/scale.md (the table), OUT/scale.json (every number, per seed) and OUT/scale.png. The cut is
computed per seed (1 - core ASR after / core ASR of the original) and reported as mean ± std over the seeds;
rates are means over the five core attacks (direct, prefill, templates, embedding, gcg).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from statistics import mean, pstdev

import yaml

from repbend.errors import RepbendError
from repbend.io import atomic_write_json, atomic_write_text
from repbend.pipeline.summary import CORE_ATTACKS, aggregate


def _core_rate(row: dict, kind: str) -> float | None:
    vals = [row[f"{kind}/{a}"] for a in CORE_ATTACKS if f"{kind}/{a}" in row]
    return mean(vals) if vals else None


def model_numbers(entry: dict) -> dict:
    """Per-seed and mean ± std numbers of one model (original and RepBend)."""
    agg = aggregate({"original": [Path(entry["original"])], "repbend": [Path(p) for p in entry["repbend"]]})
    orig, seeds = agg["original"]["seeds"][0], agg["repbend"]["seeds"]
    if orig.get("core_asr") is None:
        raise RepbendError(f"{entry['original']}: no core attack results ({', '.join(CORE_ATTACKS)}).")
    per_seed = []
    for row in seeds:
        per_seed.append({
            "core_asr": row.get("core_asr"),
            "cut": 1 - row["core_asr"] / orig["core_asr"] if orig["core_asr"] else None,
            "gibberish": _core_rate(row, "gibberish"), "refusal": _core_rate(row, "refusal"),
            "over_refusal": row.get("over_refusal/compliance"), "kl": row.get("capability/benign_kl"),
            **{f"asr/{a}": row.get(f"asr/{a}") for a in CORE_ATTACKS},
        })

    def ms(key):
        vals = [s[key] for s in per_seed if s.get(key) is not None]
        return (mean(vals), pstdev(vals)) if vals else (None, None)

    keys = ["core_asr", "cut", "gibberish", "refusal", "over_refusal", "kl"] + [f"asr/{a}" for a in CORE_ATTACKS]
    return {"name": entry["name"], "params_b": float(entry["params_b"]), "n_seeds": len(per_seed),
            "original": {"core_asr": orig["core_asr"], "gibberish": _core_rate(orig, "gibberish"),
                         "refusal": _core_rate(orig, "refusal"), "over_refusal": orig.get("over_refusal/compliance"),
                         **{f"asr/{a}": orig.get(f"asr/{a}") for a in CORE_ATTACKS}},
            "repbend": {k: dict(zip(("mean", "std"), ms(k))) for k in keys}, "seeds": per_seed,
            "runs": {"original": entry["original"], "repbend": list(entry["repbend"])}}


def _pct(m, s=None, signed=False) -> str:
    if m is None:
        return "–"
    f = "{:+.1f}" if signed else "{:.1f}"
    return f.format(100 * m) + (f" ± {100 * s:.1f}" if s else "")


def to_markdown(models: list[dict]) -> str:
    lines = ["| model | params | seeds | core ASR original | core ASR RepBend | cut | gibberish (orig -> RepBend) | "
             "refusal (orig -> RepBend) | over-refusal compliance (orig -> RepBend) | change | benign KL |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        o, r = m["original"], m["repbend"]
        d_or = r["over_refusal"]["mean"] - o["over_refusal"] if None not in (r["over_refusal"]["mean"], o["over_refusal"]) else None
        kl = r["kl"]["mean"]
        lines.append(
            f"| {m['name']} | {m['params_b']:.3g}B | {m['n_seeds']} | {_pct(o['core_asr'])} | "
            f"{_pct(r['core_asr']['mean'], r['core_asr']['std'])} | **{_pct(r['cut']['mean'], r['cut']['std'])}** | "
            f"{_pct(o['gibberish'])} -> {_pct(r['gibberish']['mean'])} | {_pct(o['refusal'])} -> {_pct(r['refusal']['mean'])} | "
            f"{_pct(o['over_refusal'])} -> {_pct(r['over_refusal']['mean'], r['over_refusal']['std'])} | "
            f"{_pct(d_or, signed=True)} | {'–' if kl is None else f'{kl:.4f}'} |")
    lines += ["", "Core ASR % per attack, original -> RepBend (mean over seeds):", "",
              "| model | " + " | ".join(CORE_ATTACKS) + " |", "|---|" + "---|" * len(CORE_ATTACKS)]
    for m in models:
        lines.append(f"| {m['name']} | " + " | ".join(
            f"{_pct(m['original'][f'asr/{a}'])} -> {_pct(m['repbend'][f'asr/{a}']['mean'])}" for a in CORE_ATTACKS) + " |")
    return "\n".join(lines) + "\n"


def plot(models: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [m["params_b"] for m in models]

    def rb(ax, key, color, label="RepBend"):
        ax.errorbar(x, [100 * m["repbend"][key]["mean"] for m in models],
                    yerr=[100 * (m["repbend"][key]["std"] or 0) for m in models], fmt="o-", color=color, capsize=3,
                    label=label)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, color, ylabel in ((axes[0], "core_asr", "tab:red", "core-attack ASR %"),
                                   (axes[2], "over_refusal", "tab:blue", "held-out over-refusal compliance %")):
        ax.plot(x, [100 * m["original"][key] for m in models], "o-", color="tab:gray", label="original")
        rb(ax, key, color)
        ax.set_ylabel(ylabel)
    ax = axes[1]
    rb(ax, "cut", "tab:red", "RepBend (this CPU budget)")
    ax.axhspan(91, 95, color="tab:green", alpha=0.2, label="paper, 7-8B (91-95%)")
    ax.axhline(90, color="tab:green", ls="--", lw=1, label="target 90%")
    ax.set_ylabel("cut of core ASR %")
    ax.set_ylim(min(0, min(100 * m["repbend"]["cut"]["mean"] for m in models) - 5), 100)
    for ax in axes:
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(x, [m["name"].split("-Instruct")[0] for m in models], rotation=15, fontsize=7)
        ax.set_xlabel("model (log parameters)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle("RepBend by model size (mean ± std over training seeds)", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", help="YAML listing the models and their evaluation folders (see the module docstring).")
    ap.add_argument("-o", "--output-dir", required=True)
    a = ap.parse_args(argv)
    try:
        spec = yaml.safe_load(Path(a.study).read_text(encoding="utf-8")) or {}
        entries = spec.get("models") or []
        if not entries:
            raise RepbendError(f"{a.study}: list the models under `models:` (name, params_b, original, repbend).")
        for e in entries:
            missing = [k for k in ("name", "params_b", "original", "repbend") if k not in e]
            if missing:
                raise RepbendError(f"{a.study}: model entry {e.get('name', e)!r} lacks {', '.join(missing)}.")
        models = sorted((model_numbers(e) for e in entries), key=lambda m: m["params_b"])
    except (RepbendError, OSError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(models)
    atomic_write_text(out / "scale.md", md)
    atomic_write_json(out / "scale.json", {"models": models})
    plot(models, out / "scale.png")
    print(md)
    print(f"wrote {out / 'scale.md'}, {out / 'scale.json'}, {out / 'scale.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
