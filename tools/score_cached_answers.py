"""Re-score saved answers with a judge: a cut-off tuning sweep's caches, or finished eval folders.

Finished evaluation folders (``--eval-dir``, repeatable): every answer in ``completions.jsonl`` (attacks,
white-box attacks included, and over-refusal) is judged again and the per-attack ASR, the average and
core averages and the over-refusal compliance are printed beside the numbers in the folder's
``results.json`` (nothing is generated or rewritten):

    python tools/score_cached_answers.py --eval-dir runs/demo/eval-original --eval-dir runs/demo/eval-repbend-s0 \
        [--judge default] [--json out.json]

Cut-off sweeps (``<trial>/eval/cache.jsonl``):

When a sweep stops during evaluation (a lease ends, a job is killed), `repbend tune --rejudge` cannot
help: only finished trials have ``completions.jsonl``. Every generated answer is in the trial's
generation cache, though. This script scores, per trial folder, each prompt attack (direct, prefill,
templates, ...) whose answers are complete — as many cached answers as the finished original model
has — with a judge (default: the default judge), and prints ASR / refusal / gibberish in %. White-box
attacks and over-refusal are not scored (their cache rows are not plain answers, or are missing).

    python tools/score_cached_answers.py runs/tune-gpu [--judge default] [--json out.json]

Needs the sweep's finished ``original`` trial (behaviour texts, the complete answer counts, and each
behaviour's prefilled opening, which is put back in front of the cached continuation as the runner does).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from repbend.evaluation.judges import JUDGES
from repbend.evaluation.suites import build
from repbend.evaluation.types import JudgeItem
from repbend.io import read_jsonl

PROMPT_ATTACKS = ("direct", "prefill", "templates", "obfuscation", "system_prompt", "best_of_n")


def score(out: Path, judge_name: str = "default") -> dict[str, dict[str, dict[str, float]]]:
    base = out / "original" / "eval"
    if not (base / "completions.jsonl").is_file():
        raise SystemExit(f"error: {base / 'completions.jsonl'} is missing; the sweep's original model must have finished.")
    done = read_jsonl(base / "completions.jsonl")
    behaviour = {r["behaviour_id"]: r["behaviour"] for r in done if "behaviour" in r}
    complete = Counter(r["attack"] for r in done if r.get("attack") in PROMPT_ATTACKS)
    opening = {(r["attack"], r["behaviour_id"]): r.get("prefill") or "" for r in done if r.get("attack") in complete}
    _, judge = build(JUDGES, {"name": judge_name})
    table: dict[str, dict[str, dict[str, float]]] = {}
    for cache in sorted(out.glob("*/eval/cache.jsonl")):
        rows = [r for r in read_jsonl(cache) if r.get("kind") == "completion" and r.get("attack") in complete]
        for attack, n in complete.items():
            rs = [r for r in rows if r["attack"] == attack]
            if len(rs) != n:
                continue
            vs = judge.score([JudgeItem(behaviour=behaviour[r["behaviour_id"]],
                                        response=opening.get((attack, r["behaviour_id"]), "") + r["text"]) for r in rs])
            table.setdefault(cache.parent.parent.name, {})[attack] = {
                "asr": 100 * sum(v.harmful for v in vs) / n, "refusal": 100 * sum(v.refused for v in vs) / n,
                "gibberish": 100 * sum(v.gibberish for v in vs) / n, "n": n}
    return table


def rescore_eval(folder: Path, judge: str | dict = "default") -> dict:
    """Judge every answer of a finished eval folder again; ``{"old": numbers, "new": numbers}``.

    Numbers: ``asr`` (per attack: mean ASR over benchmarks), ``average_asr``, ``core_asr``,
    ``over_refusal`` (per set: compliance, refusal, gibberish). ASR is aggregated as the runner does
    (per attack class: mean over variants, or any-success for best-of-N-like attacks). ``judge``: a
    judge name or a spec ``{"name": ..., <Config fields>}``.
    """
    from repbend.evaluation.attacks import ATTACKS
    from repbend.evaluation.overrefusal import rates as or_rates
    from repbend.evaluation.scoring import average_asr, summarize
    from repbend.evaluation.types import Completion
    from repbend.pipeline.summary import core_average

    res_path, comp_path = folder / "results.json", folder / "completions.jsonl"
    if not res_path.is_file() or not comp_path.is_file():
        raise SystemExit(f"error: {folder} has no results.json/completions.jsonl; it must be a finished eval folder.")
    old = json.loads(res_path.read_text(encoding="utf-8"))
    rows = read_jsonl(comp_path)
    specs = (old.get("meta", {}).get("suite", {}).get("config") or {}).get("attacks") or []
    cls_of = {(s.get("label") or s["name"]): s["name"] for s in specs}
    spec = judge if isinstance(judge, dict) else {"name": judge}
    _, judge = build(JUDGES, spec)
    groups: dict[tuple, list[dict]] = {}
    safe: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("attack") == "over_refusal":
            safe.setdefault(r["benchmark"], []).append(r)
        elif "harmful" in r:
            groups.setdefault((r["attack"], r["benchmark"]), []).append(r)
    table: dict[str, dict] = {}
    for (attack, bench), rs in groups.items():
        vs = judge.score([JudgeItem(behaviour=r["behaviour"], response=r["response"], context=r.get("context"))
                          for r in rs])
        comps = [Completion(r["behaviour_id"], attack, r["variant"], r["messages"], r["prefill"], r["text"], r["sample"])
                 for r in rs]
        n = old["asr"].get(attack, {}).get(bench, {}).get("n") or len({r["behaviour_id"] for r in rs})
        agg = getattr(ATTACKS.get(cls_of.get(attack, attack)), "aggregate", "mean")
        table.setdefault(attack, {})[bench] = summarize(comps, vs, n, agg)
    safe_rates = {}
    for bench, rs in safe.items():
        vs = judge.score([JudgeItem(behaviour=r["prompt"], response=r["response"]) for r in rs])
        safe_rates[bench] = or_rates([bool(v.harmful) for v in vs], vs)

    def numbers(asr: dict, sets: dict) -> dict:
        per_attack = {a: sum(b["asr"] for b in bs.values()) / len(bs) for a, bs in asr.items()}
        return {"asr": per_attack, "average_asr": average_asr(asr), "core_asr": core_average(per_attack),
                "over_refusal": {k: {m: v.get(m) for m in ("n", "compliance", "refusal", "gibberish")}
                                 for k, v in sets.items()}}

    return {"judge_old": (old.get("judge") or {}).get("name"), "judge_new": spec["name"],
            "old": numbers(old["asr"], (old.get("over_refusal") or {}).get("sets") or {}),
            "new": numbers(table, safe_rates)}


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def print_rescore(folder: Path, r: dict) -> None:
    print(f"{folder}  (old judge {r['judge_old']}, new judge {r['judge_new']}; % old -> new)")
    for attack, v in r["old"]["asr"].items():
        print(f"  {attack:<18} ASR {_pct(v)} -> {_pct(r['new']['asr'].get(attack))}")
    for k in ("average_asr", "core_asr"):
        print(f"  {k:<18}     {_pct(r['old'][k])} -> {_pct(r['new'][k])}")
    for s, v in r["old"]["over_refusal"].items():
        nv = r["new"]["over_refusal"].get(s, {})
        print(f"  over-refusal {s:<11} compliance {_pct(v['compliance'])} -> {_pct(nv.get('compliance'))}"
              f"  refusal {_pct(v['refusal'])} -> {_pct(nv.get('refusal'))}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path, nargs="?", help="A tuning sweep folder (cut-off trials).")
    ap.add_argument("--eval-dir", type=Path, action="append", default=[],
                    help="A finished eval folder to re-judge (repeatable); old vs new numbers are printed.")
    ap.add_argument("--judge", default="default", help="Judge name (default, refusal, ...).")
    ap.add_argument("--json", type=Path, help="Also write the table as JSON here.")
    a = ap.parse_args(argv)
    if a.eval_dir:
        out = {str(d): rescore_eval(d, a.judge) for d in a.eval_dir}
        for d, r in out.items():
            print_rescore(Path(d), r)
        if a.json:
            a.json.write_text(json.dumps(out, indent=1))
        return 0
    if a.sweep_dir is None:
        ap.error("give a sweep folder or --eval-dir")
    table = score(a.sweep_dir, a.judge)
    for trial, attacks in table.items():
        print(trial, "  ".join(f"{k}: ASR {v['asr']:.1f} refusal {v['refusal']:.1f} gibberish {v['gibberish']:.1f}"
                               for k, v in attacks.items()))
    if a.json:
        a.json.write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
