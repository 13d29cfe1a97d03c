"""Running a sweep: each trial trained (or reused) and evaluated, in one or several processes; re-judging."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from repbend.config import read_yaml
from repbend.errors import ConfigError, RepbendError
from repbend.io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl
from repbend.paths import resolve_config
from repbend.pipeline.tune.config import BASELINE, TRIALS_FILE, SweepConfig
from repbend.pipeline.tune.trials import check, final_train_metrics, reusable_run, seed_ident, train_config

CELL_KEYS = ("asr", "worst_case", "gibberish", "refusal", "n")   # per attack x benchmark, what ranking reads


def headline(results) -> dict:
    """The numbers ranking needs (a trial record's ``results``), from a :class:`~repbend.evaluation.results.Results`."""
    from repbend.evaluation.results import Results

    results = Results.coerce(results)
    return {"asr": {a: {b: {k: getattr(c, k) for k in CELL_KEYS} for b, c in benches.items()}
                    for a, benches in results.asr.items()},
            "average_asr": results.average_asr,
            "overrefusal": results.set_rates("overrefusal").compliance,
            "benign": results.set_rates("benign").compliance,
            "kl": results.benign_kl, "judge": results.judge_name}


def run_trial(sweep: SweepConfig, trial: dict, out: Path, device: str | None) -> dict:
    """Train (unless baseline) and evaluate one trial; returns its record for ``trials.jsonl``."""
    from repbend.evaluation import runner
    from repbend.evaluation.suites import load_suite
    from repbend.pipeline.jobs import train_or_resume, with_reference_model

    t0 = time.perf_counter()
    rec: dict[str, Any] = {"name": trial["name"], "overrides": trial["overrides"], **seed_ident(trial)}
    suite = load_suite(sweep.suite, list(sweep.suite_overrides))
    if trial["name"] == BASELINE:
        model = read_yaml(resolve_config(sweep.train_config)).get("model", {}).get("name", "default")
        adapter = None
    else:
        tcfg = train_config(sweep, trial, out)
        model = tcfg.model.name
        if trial.get("reuse"):
            run = str(reusable_run(tcfg, trial["reuse"].format(seed=tcfg.training.seed)))
            rec["reused"] = run
        else:
            train_or_resume(tcfg)
            run = tcfg.output_dir
        adapter = None if tcfg.full_finetune else run
        if tcfg.full_finetune:
            suite = with_reference_model(suite, tcfg.model.name)
            model = run
        rec["train"] = final_train_metrics(Path(run))
    rec["train_seconds"] = round(time.perf_counter() - t0, 1)
    ecfg = runner.EvalConfig(model=model, adapter=adapter, suite=suite, output_dir=str(out / trial["slug"] / "eval"),
                             device=device, dtype=sweep.eval_dtype, progress=False, report=False, overwrite=True)
    rec["results"] = headline(runner.evaluate(ecfg))
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec


def _worker(args: tuple) -> None:
    sweep_dict, trials, out, device, deadline, threads = args
    import torch

    torch.set_num_threads(threads)
    sweep = SweepConfig.model_validate(sweep_dict)
    for t in trials:
        if deadline and time.time() > deadline:
            append_jsonl(Path(out) / "skipped.jsonl", {"name": t["name"], "reason": "deadline"})
            continue
        try:
            rec = run_trial(sweep, t, Path(out), device)
        except RepbendError as e:        # e.g. a divergence stop: record it, go on with the others
            rec = {"name": t["name"], "overrides": t["overrides"], "error": str(e), **seed_ident(t)}
        append_jsonl(Path(out) / TRIALS_FILE, rec)


def done_trials(out: Path) -> dict[str, dict]:
    path = out / TRIALS_FILE
    return {r["name"]: r for r in read_jsonl(path)} if path.is_file() else {}


def run_sweep(sweep: SweepConfig, out: Path, *, workers: int = 1, device: str | None = None,
              time_budget_s: float | None = None, only: list[str] | None = None) -> dict[str, dict]:
    """Run every unfinished trial (the baseline first); returns all finished records by name."""
    import multiprocessing as mp

    from repbend.evaluation.suites import load_suite, split_spec

    trials = check(sweep, out)
    out.mkdir(parents=True, exist_ok=True)
    attacks = {split_spec(a)[1]: a["name"] for a in load_suite(sweep.suite, list(sweep.suite_overrides)).attacks}
    atomic_write_json(out / "sweep.json", {**sweep.model_dump(mode="json"), "expanded": trials,
                                          "attack_classes": attacks})
    todo = ([{"name": BASELINE, "overrides": [], "slug": BASELINE}] if sweep.baseline else []) + trials
    finished = {n for n, r in done_trials(out).items() if "results" in r}   # failed trials are tried again
    todo = [t for t in todo if t["name"] not in finished]
    if only:      # a trial's name selects all its seeds; `name@sN` one of them
        unknown = sorted(set(only) - {t["name"] for t in trials} - {t.get("base") for t in trials} - {BASELINE})
        if unknown:
            raise ConfigError(f"--only names unknown trials: {', '.join(unknown)}")
        todo = [t for t in todo if t["name"] in only or t.get("base") in only]
    deadline = time.time() + time_budget_s if time_budget_s else None
    threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
    if workers <= 1 or len(todo) <= 1:
        _worker((sweep.model_dump(mode="json"), todo, str(out), device, deadline, threads))
    else:
        shares = [todo[i::workers] for i in range(workers)]
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers) as pool:
            pool.map(_worker, [(sweep.model_dump(mode="json"), s, str(out), device, deadline, threads)
                               for s in shares if s])
    return done_trials(out)


def rejudge(out: Path, judge_spec: dict | None = None) -> dict[str, dict]:
    """Re-score every trial's saved completions with ``judge_spec`` (default judge) through the evaluation
    runner's scoring (:func:`repbend.evaluation.runner.rescore`); rewrite trials.jsonl, keeping the earlier
    scores under ``results_by_judge``."""
    from repbend.evaluation.judges import JUDGES
    from repbend.evaluation.runner import rescore
    from repbend.evaluation.scoring import average_asr
    from repbend.evaluation.suites import build

    spec = judge_spec or {"name": "default"}
    _, judge = build(JUDGES, spec)
    recs = done_trials(out)
    if not recs:
        raise RepbendError(f"{out / TRIALS_FILE} has no finished trials; run the sweep first.")
    meta = json.loads((out / "sweep.json").read_text())
    slugs = {t["name"]: t["slug"] for t in meta["expanded"]}
    slugs[BASELINE] = BASELINE
    for name, rec in recs.items():
        if "results" not in rec:
            continue
        old = rec["results"]
        rows = read_jsonl(out / slugs[name] / "eval" / "completions.jsonl")
        n = {(a, b): c.get("n") for a, benches in old["asr"].items() for b, c in benches.items()}
        cells, safe_rates = rescore(rows, judge, attack_classes=meta.get("attack_classes", {}), n=n)
        table = {a: {b: {k: c.get(k) for k in CELL_KEYS} for b, c in benches.items()} for a, benches in cells.items()}
        rec["results_by_judge"] = {**rec.get("results_by_judge", {}),
                                   old["judge"]: {"asr": old["asr"], "average_asr": old["average_asr"]}}
        rec["results"] = {**old, "asr": table, "average_asr": average_asr(table), "judge": spec["name"],
                          **{k: v["compliance"] for k, v in safe_rates.items()}, "safe_sets": safe_rates}
    atomic_write_text(out / TRIALS_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in recs.values()))
    return recs
