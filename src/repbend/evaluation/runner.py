"""``evaluate(cfg)``: attack a model with a suite, judge every answer, write results and a report.

Output folder (``cfg.output_dir``)::

    config.yaml, run_info.json   resolved EvalConfig, versions, git commit
    eval_target.json             which model/adapter (+ weight fingerprint) these results belong to
    cache.jsonl                  every generated answer, appended per batch (resume = rerun the command)
    completions.jsonl            every completion with its verdict (and the over-refusal answers)
    results.json                 asr / average_asr / over_refusal / capability / judge / meta
                                 (schema: :class:`repbend.evaluation.results.Results`)
    report.md + *.png            written by repbend.evaluation.report (unless ``report`` is off)

A folder holding results of a different model or adapter is refused unless ``overwrite`` is set;
the same model resumes from the cache.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import Field

from repbend.config import Section
from repbend.errors import RepbendError
from repbend.evaluation.attacks.base import AttackSkipped, ensure_targets
from repbend.evaluation.results import Results
from repbend.evaluation.scoring import average_asr, summarize
from repbend.evaluation.suites import Suite, build
from repbend.evaluation.types import JudgeItem
from repbend.io import (OptionalUserPath, UserPath, atomic_write_json, claim_output, output_lock, package_versions,
                        write_jsonl, write_run_info)

IDENTITY_FILE = "eval_target.json"
OWN_FILES = ("cache.jsonl", "completions.jsonl", "results.json", IDENTITY_FILE)


class EvalConfig(Section):
    model: str = Field("default", description="Model to evaluate: alias, hub id or folder.")
    adapter: OptionalUserPath = Field(None, description="LoRA adapter folder applied on top of the model.")
    suite: Suite = Field(..., description="The evaluation suite (see configs/suites).")
    output_dir: UserPath = Field(..., description="Folder for results, cache and report.")
    overwrite: bool = Field(False, description="Replace results of a different model in output_dir.")
    device: str | None = Field(None, description="Device (default: cuda if available, else cpu).")
    dtype: str | None = Field(None, description="Model dtype (default: the loader's choice).")
    progress: bool = Field(True, description="Show progress bars.")
    report: bool = Field(True, description="Write report.md and plots after the results.")


def _echo(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg)


def read_identity(path: Path, overwrite: bool) -> dict | None:
    """The folder's ``eval_target.json`` (None if missing, or damaged while ``overwrite``: it is replaced)."""
    import json

    if not path.is_file():
        return None
    try:
        ident = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(ident, dict):
            raise ValueError("not an object")
        return ident
    except (ValueError, UnicodeDecodeError):
        if overwrite:
            return None
        raise RepbendError(f"{path} is damaged (not the JSON object repbend writes), so the results in {path.parent} "
                           f"cannot be matched to a model; pass --overwrite to start this evaluation over, or choose "
                           f"another --output-dir.") from None


def prepare_output(out: Path, model: str, adapter: str | None, overwrite: bool) -> None:
    """Refuse a folder holding another kind of run or another model's results (unless ``overwrite``); clear it when
    overwriting. Call it while holding the folder's :func:`repbend.io.output_lock`."""
    claim_output(out, "eval", overwrite=overwrite)
    ident_path = out / IDENTITY_FILE
    ident = read_identity(ident_path, overwrite)
    if ident is not None:
        same = (ident.get("model"), ident.get("adapter")) == (model, adapter)
        if not same and not overwrite:
            raise RepbendError(
                f"{out} holds results of model {ident.get('model')!r} (adapter {ident.get('adapter')!r}), not "
                f"{model!r} (adapter {adapter!r}); choose another --output-dir or pass --overwrite.")
        if not same or overwrite:
            for name in OWN_FILES:
                (out / name).unlink(missing_ok=True)
    elif (out / "results.json").is_file() and not overwrite:
        raise RepbendError(f"{out} holds results.json of an unknown model; choose another --output-dir or "
                           f"pass --overwrite.")
    elif overwrite:
        for name in OWN_FILES:
            (out / name).unlink(missing_ok=True)


def check_fingerprint(out: Path, ident: dict, overwrite: bool) -> None:
    path = out / IDENTITY_FILE
    old = read_identity(path, overwrite)
    if old is not None:
        if old.get("fingerprint") != ident["fingerprint"]:
            if not overwrite:
                raise RepbendError(f"The weights of {ident['model']!r} changed since {out} was written (fingerprint "
                                   f"{old.get('fingerprint')} -> {ident['fingerprint']}); pass --overwrite or use "
                                   f"another --output-dir.")
            for name in OWN_FILES:
                (out / name).unlink(missing_ok=True)
    atomic_write_json(path, ident)


def load_benchmarks(suite: Suite) -> dict[str, tuple[Any, list]]:
    from repbend.evaluation.benchmarks import BENCHMARKS

    out = {}
    for spec in suite.benchmarks:
        label, bench = build(BENCHMARKS, spec)
        out[label] = (bench, bench.load())
    return out


def attack_subset(behaviours: list, n: int | None, seed: int) -> list:
    """A seeded, category-stratified subset of ``n`` behaviours (all when ``n`` is None)."""
    from repbend.evaluation.benchmarks.packaged import stratified_subset

    rows = [{"i": i, "category": b.category} for i, b in enumerate(behaviours)]
    return [behaviours[r["i"]] for r in stratified_subset(rows, n, seed)]


def attack_behaviours(suite: Suite, spec: dict, label: str, attack: Any, bench_label: str, behaviours: list) -> list:
    """The behaviours ``attack`` runs on one benchmark: the suite's seeded subset, with targets when it needs them
    (RepbendError when a target is missing and the suite does not allow the generic one)."""
    bs = attack_subset(behaviours, spec.get("n_behaviours"), suite.seed)
    if type(attack).needs_target:
        bs = ensure_targets(label, bs, bench_label, allow_generic=suite.allow_generic_target,
                            generic_target=suite.generic_target)
    return bs


def build_attacks(suite: Suite) -> list[tuple[dict, str, Any]]:
    """``(spec, label, attack)`` for every attack of the suite, built once."""
    from repbend.evaluation.attacks import ATTACKS

    return [(spec, *build(ATTACKS, spec)) for spec in suite.attacks]


def prompt_conversations(suite: Suite, benchmarks: dict, target: Any,
                         attacks: list[tuple[dict, str, Any]] | None = None) -> list:
    """Every conversation the suite's black-box attacks (:class:`PromptAttack`) and over-refusal sets will hand the
    target, each carrying its attack's generation settings. They depend on the behaviours only, never on an
    answer, so they can be generated before the attacks run: in one generator call per settings, where the
    length batching fills whole batches across attacks (a 24-request attack alone pays a 24-row decode step as
    much as a 64-row one). An attack that would be skipped or fail is left to :func:`run_attacks`."""
    from repbend.evaluation.attacks.base import PromptAttack
    from repbend.evaluation.overrefusal import load_sets, set_conversations
    from repbend.evaluation.target import with_settings

    convs: list = []
    for spec, label, attack in attacks if attacks is not None else build_attacks(suite):
        if not isinstance(attack, PromptAttack):
            continue
        try:
            attack.check(target)
        except AttackSkipped:
            continue
        settings = attack.settings(target.settings)
        for bench_label, (_, behaviours) in benchmarks.items():
            try:
                bs = attack_behaviours(suite, spec, label, attack, bench_label, behaviours)
            except RepbendError:
                continue
            convs += [with_settings(c, c.settings or settings) for b in bs for c in attack.conversations(b)]
    if suite.over_refusal.enabled:
        for name, prompts in load_sets(suite.over_refusal).items():
            convs += [with_settings(c, target.settings) for c in set_conversations(name, prompts)]
    return convs


def run_attacks(suite: Suite, benchmarks: dict, target: Any, store: Any, judge: Any,
                attacks: list[tuple[dict, str, Any]] | None = None) -> tuple[dict, list, dict]:
    """Run every attack (built by :func:`build_attacks` unless given) on every benchmark; returns (asr table,
    completion rows, per-attack meta)."""
    asr: dict[str, dict] = {}
    rows: list[dict] = []
    meta: dict[str, Any] = {"skipped": {}, "timings": {}, "provenance": {}, "white_box": []}
    attacks = attacks if attacks is not None else build_attacks(suite)
    for i, (spec, label, attack) in enumerate(attacks, 1):
        t0 = time.perf_counter()
        for bench_label, (bench, behaviours) in benchmarks.items():
            n = min(len(behaviours), spec.get("n_behaviours") or len(behaviours))
            _echo(f"[{i}/{len(suite.attacks)}] attack {label} on {bench_label} ({n} behaviours)")
            try:
                bs = attack_behaviours(suite, spec, label, attack, bench_label, behaviours)
                comps = attack.run(bs, target, store)
            except AttackSkipped as e:
                meta["skipped"][label] = str(e)
                _echo(f"  skipped {label}: {e}")
                break
            by_id = {b.id: b for b in bs}
            res, verdicts = score_cell(judge, comps, {b.id: (b.prompt, b.context) for b in bs}, len(bs),
                                       getattr(type(attack), "aggregate", "mean"))
            asr.setdefault(label, {})[bench_label] = res
            _echo(f"  {label}/{bench_label}: ASR {res['asr']:.3f}  worst-case {res['worst_case']:.3f}  "
                  f"gibberish {res['gibberish']:.3f}  refusal {res['refusal']:.3f}")
            for c, v in zip(comps, verdicts):
                b = by_id[c.behaviour_id]
                rows.append({"attack": label, "benchmark": bench_label, "behaviour_id": c.behaviour_id,
                             "variant": c.variant, "sample": c.sample, "behaviour": b.prompt, "context": b.context,
                             "category": b.category, "messages": c.messages, "prefill": c.prefill, "text": c.text,
                             "response": c.response, "harmful": v.harmful, "refused": v.refused,
                             "gibberish": v.gibberish, "score": v.score, "reason": v.reason, "meta": c.meta})
        meta["timings"][label] = round(time.perf_counter() - t0, 2)
        if getattr(attack, "provenance", None):
            meta["provenance"][label] = attack.provenance
        if getattr(type(attack), "white_box", False):
            meta["white_box"].append(label)
    return asr, rows, meta


def score_cell(judge: Any, comps: list, requests: dict[str, tuple[str, str | None]], n: int,
               aggregate: str = "mean") -> tuple[dict, list]:
    """Judge one attack's completions on one benchmark; returns (its ``results.json`` cell, the verdicts).

    ``requests`` maps a behaviour id to its (request, context) as the judge sees them."""
    items = [JudgeItem(behaviour=requests[c.behaviour_id][0], response=c.response,
                       context=requests[c.behaviour_id][1]) for c in comps]
    verdicts = judge.score(items)
    return summarize(comps, verdicts, n, aggregate), verdicts


def rescore(rows: list[dict], judge: Any, *, attack_classes: dict[str, str] | None = None,
            n: dict[tuple[str, str], int] | None = None) -> tuple[dict, dict]:
    """Re-judge saved ``completions.jsonl`` rows with ``judge`` (nothing is generated again).

    Attack rows are scored as :func:`run_attacks` scores them (``attack_classes`` maps a label to its
    registry name, for the attack's aggregate; ``n`` gives each (attack, benchmark)'s behaviour count,
    default: the distinct behaviours in the rows); the over-refusal rows are scored with the same judge
    (complied = judged as engaging). Returns (asr table, ``{set: rates}``)."""
    from repbend.evaluation.attacks import ATTACKS
    from repbend.evaluation.overrefusal import ATTACK_NAME, rates
    from repbend.evaluation.types import Completion

    safe: dict[str, list[dict]] = {}
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r.get("attack") == ATTACK_NAME:
            safe.setdefault(r["benchmark"], []).append(r)
        elif "harmful" in r:
            groups.setdefault((r["attack"], r["benchmark"]), []).append(r)
    safe_rates = {}
    for name, rs in safe.items():
        verdicts = judge.score([JudgeItem(behaviour=r["prompt"], response=r["response"]) for r in rs])
        safe_rates[name] = rates([bool(v.harmful) for v in verdicts], verdicts)
    table: dict[str, dict] = {}
    for (attack, bench), rs in groups.items():
        comps = [Completion(r["behaviour_id"], attack, r["variant"], r["messages"], r["prefill"], r["text"],
                            r["sample"]) for r in rs]
        requests = {r["behaviour_id"]: (r["behaviour"], r.get("context")) for r in rs}
        cls = ATTACKS.get((attack_classes or {}).get(attack, attack))
        count = (n or {}).get((attack, bench)) or len({r["behaviour_id"] for r in rs})
        table.setdefault(attack, {})[bench] = score_cell(judge, comps, requests, count,
                                                         getattr(cls, "aggregate", "mean"))[0]
    return table, safe_rates


def run_capability(cfg: EvalConfig, model: Any, tokenizer: Any, out: Path) -> dict:
    """Capability numbers from repbend.evaluation.capability (MMLU subset, KL/perplexity vs original)."""
    if cfg.suite.capability is None:
        return {}
    from repbend.evaluation import capability

    return capability.evaluate_capability(model, tokenizer, cfg.suite.capability, model_spec=cfg.model,
                                          adapter=cfg.adapter, out_dir=out, progress=cfg.progress)


def evaluate(cfg: EvalConfig, *, model: Any = None, tokenizer: Any = None) -> Results:
    """Evaluate ``cfg.model`` (+ adapter) with ``cfg.suite``; returns what ``results.json`` holds.

    Pass ``model``/``tokenizer`` to evaluate an already loaded model (``cfg.model`` is then only a label).
    The evaluation holds an exclusive lock on its output folder throughout.
    """
    with output_lock(Path(cfg.output_dir)):
        return _evaluate(cfg, model, tokenizer)


def _evaluate(cfg: EvalConfig, model: Any, tokenizer: Any) -> dict:
    from repbend.evaluation.judges import JUDGES
    from repbend.evaluation.overrefusal import evaluate_over_refusal
    from repbend.evaluation.store import Store
    from repbend.evaluation.target import ModelTarget, fingerprint_model
    from repbend.seeding import seed_everything

    t_start = time.perf_counter()
    suite, out = cfg.suite, Path(cfg.output_dir)
    prepare_output(out, cfg.model, cfg.adapter, cfg.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(suite.seed)
    _, judge = build(JUDGES, suite.judge)          # fail on config errors before loading anything heavy
    benchmarks = load_benchmarks(suite)
    timings: dict[str, float] = {}
    if model is None:
        from repbend.models import load_model

        t0 = time.perf_counter()
        model, tokenizer = load_model(cfg.model, cfg.adapter, device=cfg.device, dtype=cfg.dtype)
        timings["load_model"] = round(time.perf_counter() - t0, 2)
    ident = {"model": cfg.model, "adapter": cfg.adapter, "fingerprint": fingerprint_model(model, cfg.model, cfg.adapter or "")}
    check_fingerprint(out, ident, cfg.overwrite)
    write_run_info(out, cfg, seed=suite.seed, kind="eval", model=cfg.model, adapter=cfg.adapter, fingerprint=ident["fingerprint"])

    store = Store(out / "cache.jsonl")
    gen = suite.generation
    target = ModelTarget(model, tokenizer, store, batch_size=gen.batch_size, fingerprint=ident["fingerprint"],
                         settings=gen.settings(), progress=cfg.progress, group=gen.group)
    attacks = build_attacks(suite)
    if gen.pool:
        t0 = time.perf_counter()
        _echo("generating the answers of every black-box attack and the over-refusal sets together")
        target.generate(prompt_conversations(suite, benchmarks, target, attacks), group=10 ** 6)
        timings["generate_pooled"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    asr, rows, attack_meta = run_attacks(suite, benchmarks, target, store, judge, attacks)
    timings["attacks"] = round(time.perf_counter() - t0, 2)

    over_refusal: dict = {"n": 0, "compliance": None}
    if suite.over_refusal.enabled:
        t0 = time.perf_counter()
        _echo("over-refusal: answering safe prompts")
        over_refusal, or_rows = evaluate_over_refusal(target, suite.over_refusal)
        rows += or_rows
        timings["over_refusal"] = round(time.perf_counter() - t0, 2)
        _echo(f"  over-refusal compliance {over_refusal['compliance']:.3f} (n={over_refusal['n']})")

    t0 = time.perf_counter()
    capability = run_capability(cfg, model, tokenizer, out)
    if suite.capability is not None:
        timings["capability"] = round(time.perf_counter() - t0, 2)
    timings["total"] = round(time.perf_counter() - t_start, 2)

    results = Results.model_validate({
        "asr": asr,
        "average_asr": average_asr(asr),
        "over_refusal": over_refusal,
        "capability": capability,
        "judge": {"name": suite.judge["name"], "config": judge.config.model_dump(mode="json")
                  if getattr(judge, "config", None) is not None else {}},
        "meta": {
            "model": cfg.model, "adapter": cfg.adapter, "fingerprint": ident["fingerprint"],
            "suite": {"name": suite.name, "config": suite.model_dump(mode="json")},
            "seeds": {"suite": suite.seed, "generation": gen.seed, "over_refusal": suite.over_refusal.seed,
                      "benchmarks": {k: b.config.seed for k, (b, _) in benchmarks.items()}},
            "benchmarks": {k: b.info() for k, (b, _) in benchmarks.items()},
            "versions": package_versions(),
            "timings": {**timings, "per_attack": attack_meta["timings"]},
            "generation": {**target.throughput(), "max_new_tokens": gen.max_new_tokens,
                           "all_runs": cached_throughput(store, ident["fingerprint"])},
            "skipped": attack_meta["skipped"],
            "white_box_attacks": attack_meta["white_box"],
            "provenance": attack_meta["provenance"],
            "generic_target": suite.generic_target if suite.allow_generic_target else None,
        },
    })
    write_jsonl(out / "completions.jsonl", rows)
    results.write(out)
    if cfg.report:
        from repbend.evaluation.report import write_report

        write_report(results, out)
    _echo(f"results: {out / 'results.json'} (total {timings['total']:.0f} s)")
    return results


def cached_throughput(store: Any, fingerprint: str) -> dict:
    """Generation totals over every cached answer of this model (this run and the runs it resumed)."""
    rows = [r for r in store.records() if r.get("kind") == "completion" and r.get("fingerprint") == fingerprint]
    tokens = sum(r.get("new_tokens", 0) for r in rows)
    secs = sum(r.get("seconds", 0.0) for r in rows)
    return {"completions": len(rows), "new_tokens": tokens, "seconds": round(secs, 2),
            "tokens_per_s": round(tokens / secs, 2) if secs else None}
