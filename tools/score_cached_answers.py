"""Score the answers a cut-off tuning sweep had already generated (``<trial>/eval/cache.jsonl``).

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--judge", default="default", help="Judge name (default, refusal, ...).")
    ap.add_argument("--json", type=Path, help="Also write the table as JSON here.")
    a = ap.parse_args(argv)
    table = score(a.sweep_dir, a.judge)
    for trial, attacks in table.items():
        print(trial, "  ".join(f"{k}: ASR {v['asr']:.1f} refusal {v['refusal']:.1f} gibberish {v['gibberish']:.1f}"
                               for k, v in attacks.items()))
    if a.json:
        a.json.write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
