"""``tuning.json``, ``tuning.md`` and ``tuning.png`` of a sweep's ranking."""
from __future__ import annotations

import json
import os
from pathlib import Path

from repbend.errors import ConfigError
from repbend.io import atomic_write_json, atomic_write_text
from repbend.pipeline.tune.config import BASELINE, SelectConfig
from repbend.pipeline.tune.rank import fallback_choice, rank
from repbend.pipeline.tune.run import done_trials


def report(out: Path, select: SelectConfig | None = None, use: str | None = None) -> dict:
    """Write tuning.json, tuning.md and tuning.png into ``out``; returns the ranking.

    ``use`` names the trial actually adopted when it is not the rule's choice (e.g. no trial met every
    limit); it is recorded as ``used`` and marked in the plot, so the report says so instead of hiding it.
    """
    sweep = json.loads((out / "sweep.json").read_text())
    select = select or SelectConfig.model_validate(sweep.get("select", {}))
    recs = done_trials(out)
    rows = rank(recs, select, sweep.get("seeds"))
    chosen = fallback_choice(rows, select)
    if use is not None and use not in {r["name"] for r in rows}:
        raise ConfigError(f"--use names no finished trial: {use!r}")
    used = next((r for r in rows if r["name"] == use), chosen)
    judge = next((r["results"]["judge"] for r in recs.values() if "results" in r), "?")
    summary = {"judge": judge, "select": select.model_dump(mode="json"), "chosen": chosen, "used": used, "rows": rows}
    atomic_write_json(out / "tuning.json", summary)
    md = markdown(rows, chosen, judge, select)
    if used is not None and used is not chosen:
        md += f"\nUsed: **{used['name']}** ({used['why'] or 'within the limits'}).\n"
    atomic_write_text(out / "tuning.md", md)
    plot(rows, used, out / "tuning.png", select)
    return summary


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def markdown(rows: list[dict], chosen: dict | None, judge: str, select: SelectConfig) -> str:
    attacks = sorted({a for r in rows for a in r.get("per_attack", {})})
    seeded = int(any(r.get("seed_asr") for r in rows))
    lines = [f"Validation sweep (judge: {judge}); ASR and compliance in %, KL in nats. "
             f"Chosen: **{chosen['name'] if chosen else 'none meets the limits'}**" +
             (f" (fallback: no trial meets every limit; this one falls short by the least, "
              f"{100 * chosen['shortfall']:.1f} points)" if chosen and chosen.get("fallback") else "") + ".", "",
             "| trial | mean ASR | " + " | ".join(attacks) + (" | mean ASR per seed" if seeded else "") +
             " | gibberish | refusal | over-refusal compl. | benign compl. | KL | ok |",
             "|" + "---|" * (len(attacks) + 8 + seeded)]
    for r in rows:
        if r.get("asr") is None and "per_attack" not in r:
            label = "not ranked" if r.get("pending") else "failed"
            lines.append(f"| {r['name']} | {label}: {r['why']} |" + " |" * (len(attacks) + 6 + seeded))
            continue
        cells = [_pct(r["per_attack"].get(a)) for a in attacks]
        kl = "–" if r.get("kl") is None else f"{r['kl']:.3f}"
        if r.get("seed_asr"):
            cells.append(" / ".join(_pct(v) for v in r["seed_asr"].values()))
        elif any(x.get("seed_asr") for x in rows):
            cells.append("–")
        ok = "yes" if r["ok"] else ("(original)" if r["name"] == BASELINE else "no: " + r["why"])
        lines.append(f"| {r['name']} | {_pct(r['asr'])} | " + " | ".join(cells) +
                     f" | {_pct(r['gibberish'])} | {_pct(r['refusal'])} | {_pct(r['overrefusal'])} | "
                     f"{_pct(r['benign'])} | {kl} | {ok} |")
    lines += ["", f"Limits: over-refusal compliance may fall by at most {select.max_overrefusal_drop:g}, benign "
                  f"compliance by at most {select.max_benign_drop:g}, KL at most {select.max_kl}, gibberish at most "
                  f"{select.max_gibberish}; among trials within them, the lowest mean ASR wins (ties: lower KL)." +
                  (" If none is within them: among trials within the KL and gibberish limits, the one whose "
                   "compliance shortfall beyond its limit is smallest (ties: lower ASR)."
                   if select.fallback == "least_violation" else "")]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], chosen: dict | None, path: Path, select: SelectConfig | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get("asr") is not None]
    if not pts:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    base = next((r for r in pts if r["name"] == BASELINE), None)
    if select is not None and base is not None and base.get("overrefusal") is not None:
        axes[0].axvline(100 * (base["overrefusal"] - select.max_overrefusal_drop), ls="--", c="tab:red", lw=1,
                        label=f"limit (original - {100 * select.max_overrefusal_drop:g} points)")
        axes[0].legend(fontsize=7, loc="upper left")
    for ax, key, label in ((axes[0], "overrefusal", "over-refusal compliance, validation prompts (%)"),
                           (axes[1], "kl", "benign KL to the original (nats)")):
        for r in pts:
            if r.get(key) is None:
                continue
            x = r[key] * (100 if key != "kl" else 1)
            style = dict(marker="*", s=220, c="tab:red", zorder=3) if chosen and r["name"] == chosen["name"] else \
                dict(marker="s", s=80, c="black", zorder=3) if r["name"] == BASELINE else \
                dict(marker="o", s=40, c="tab:blue" if r["ok"] else "tab:gray", alpha=0.8)
            ax.scatter([x], [100 * r["asr"]], **style)
            ax.annotate(r["name"], (x, 100 * r["asr"]), fontsize=6, alpha=0.7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("mean ASR on HarmBench validation (%)")
        ax.grid(alpha=0.3)
    if max((r.get("kl") or 0) for r in pts) > 0.1:       # spans orders of magnitude: symlog; else linear
        axes[1].set_xscale("symlog", linthresh=0.01)
    how = " (fallback: none within the limits)" if chosen and chosen.get("fallback") else ""
    fig.suptitle(f"RepBend hyper-parameter search (black: original; red star: used{how}; grey: outside the limits)",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    os.replace(tmp, path)
