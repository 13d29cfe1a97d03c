"""Ranking: trials averaged over their seeds, checked against the limits relative to the original model."""
from __future__ import annotations

from repbend.pipeline.tune.config import BASELINE, SelectConfig


def _mean_rate(rec: dict, key: str, attacks: list[str] | None) -> float | None:
    return _mean([b.get(key) for a, benches in rec["results"]["asr"].items() if attacks is None or a in attacks
                  for b in benches.values()])


def _mean(vals: list) -> float | None:
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def _mean_results(results: list[dict]) -> dict:
    """One headline dict whose every rate is the mean over ``results`` (the seeds of one trial)."""
    first = results[0]
    asr = {a: {b: {k: (_mean([r["asr"][a][b].get(k) for r in results]) if k != "n" else cell.get("n"))
                   for k in cell}
               for b, cell in benches.items()} for a, benches in first["asr"].items()}
    return {"asr": asr, "average_asr": None, "judge": first["judge"],
            **{k: _mean([r.get(k) for r in results]) for k in ("overrefusal", "benign", "kl")}}


def aggregate(recs: dict[str, dict], seeds: list[int] | None = None) -> dict[str, dict]:
    """Merge the per-seed records (``<trial>@s<seed>``) into one record per trial, rates averaged over seeds.

    A trial with fewer finished seeds than ``seeds`` gets an ``error`` record (it cannot be ranked yet);
    records without a ``base`` (single-seed sweeps, the original model) pass through unchanged.
    """
    out: dict[str, dict] = {}
    groups: dict[str, list[dict]] = {}
    for name, rec in recs.items():
        if rec.get("base") is None:
            out[name] = rec
        else:
            groups.setdefault(rec["base"], []).append(rec)
    for base, rs in groups.items():
        done = sorted((r for r in rs if "results" in r), key=lambda r: r["seed"])
        want = len(seeds) if seeds else len(rs)
        overrides = [o for o in rs[0].get("overrides", []) if not o.startswith("training.seed=")]
        if not done or len(done) < want:
            out[base] = {"name": base, "overrides": overrides, "error": f"{len(done)} of {want} seeds finished",
                         "pending": True}
            continue
        out[base] = {"name": base, "overrides": overrides, "seeds": [r["seed"] for r in done],
                     "per_seed": {str(r["seed"]): r["results"] for r in done},
                     "results": _mean_results([r["results"] for r in done]),
                     "seconds": round(sum(r.get("seconds") or 0 for r in done), 1)}
    return out


def rank(recs: dict[str, dict], select: SelectConfig, seeds: list[int] | None = None) -> list[dict]:
    """Rows sorted best first: trials meeting every limit (vs the original model), by mean ASR then KL.

    Per-seed records are first averaged per trial (:func:`aggregate`); such rows carry ``seed_asr``.
    """
    recs = aggregate(recs, seeds)
    base = recs.get(BASELINE, {}).get("results", {})
    rows = []
    for name, rec in recs.items():
        if "results" not in rec:
            rows.append({"name": name, "ok": False, "why": rec.get("error", "no results"), "asr": None,
                         "pending": rec.get("pending", False)})
            continue
        r = rec["results"]
        row = {"name": name, "overrides": rec.get("overrides", []), "asr": _mean_rate(rec, "asr", select.attacks),
               "gibberish": _mean_rate(rec, "gibberish", select.attacks),
               "refusal": _mean_rate(rec, "refusal", select.attacks),
               "overrefusal": r.get("overrefusal"), "benign": r.get("benign"), "kl": r.get("kl"),
               "per_attack": {a: next(iter(b.values()))["asr"] for a, b in r["asr"].items()},
               "seconds": rec.get("seconds")}
        if "per_seed" in rec:
            row["seed_asr"] = {sd: _mean_rate({"results": res}, "asr", select.attacks)
                               for sd, res in rec["per_seed"].items()}
        why = []
        shortfall = 0.0
        if name != BASELINE and base:
            for key in ("overrefusal", "benign"):
                limit = select.max_overrefusal_drop if key == "overrefusal" else select.max_benign_drop
                if r.get(key) is not None and base.get(key) is not None:
                    shortfall = max(shortfall, base[key] - limit - r[key])
            if r.get("overrefusal") is not None and base.get("overrefusal") is not None \
                    and r["overrefusal"] < base["overrefusal"] - select.max_overrefusal_drop - 1e-9:
                why.append(f"over-refusal compliance {r['overrefusal']:.2f} < {base['overrefusal']:.2f} - "
                           f"{select.max_overrefusal_drop:g}")
            if r.get("benign") is not None and base.get("benign") is not None \
                    and r["benign"] < base["benign"] - select.max_benign_drop - 1e-9:
                why.append(f"benign compliance {r['benign']:.2f} < {base['benign']:.2f} - {select.max_benign_drop:g}")
        if name != BASELINE and select.max_kl is not None and (r.get("kl") or 0) > select.max_kl:
            why.append(f"KL {r['kl']:.3f} > {select.max_kl:g}")
        if name != BASELINE and select.max_gibberish is not None and (row["gibberish"] or 0) > select.max_gibberish:
            why.append(f"gibberish {row['gibberish']:.2f} > {select.max_gibberish:g}")
        row["ok"], row["why"] = name != BASELINE and not why, "; ".join(why)
        row["shortfall"] = round(shortfall, 6) if name != BASELINE else None
        row["answers"] = name != BASELINE and not any(w.startswith(("KL", "gibberish")) for w in why)
        rows.append(row)
    key = lambda x: (not x["ok"], x["asr"] if x["asr"] is not None else 9, x.get("kl") or 0)  # noqa: E731
    return sorted(rows, key=key)


def fallback_choice(rows: list[dict], select: SelectConfig) -> dict | None:
    """The rule's choice: the best trial within every limit, else (``fallback: least_violation``) the trial
    within the KL and gibberish limits whose compliance shortfall is smallest; it is marked ``fallback``."""
    chosen = next((r for r in rows if r["ok"]), None)
    if chosen is not None or select.fallback == "none":
        return chosen
    cands = [r for r in rows if r.get("answers") and r.get("asr") is not None]
    if not cands:
        return None
    best = min(cands, key=lambda r: (r["shortfall"], r["asr"]))
    best["fallback"] = True
    return best
