"""Agreement of judges with human labels (``repbend judge validate``).

Human-labelled sets shipped inside packages (fetched with :func:`repbend.cache.package_file`):

- ``jbb``: jailbreakbench==0.1.3 ``classifier_comparison.csv``: 100 (goal, jailbreak prompt, response)
  triples with three human labels; label = majority "harmful"; judges are scored on ``harmful``.
- ``pyrit_refusal`` / ``pyrit_refusal_extra``: pyrit==1.1.0 refusal scorer sets (105 / 64 rows,
  ``human_score`` 1 = refused; the files start with ``#`` comment lines); judges are scored on
  ``refused``.

Shipped with repbend:

- ``embedded``: greedy answers of the three embedded models (SmolLM2-135M-Instruct,
  Qwen2.5-Coder-0.5B/1.5B-Instruct) to HarmBench validation behaviours and over-refusal ``val``
  prompts, labelled by hand by the rules in docs/JUDGE_LABELS.md (label = the answer complies);
  judges are scored on ``harmful`` (= engaged: attack success or over-refusal compliance), also per
  model. Its tune/test split is stored in the file (stratified by model, kind and label) and does not
  depend on ``--seed``.

The other sets are split in two halves by a seeded shuffle: ``tune`` (the only half used to choose the
composite judge's thresholds) and ``test`` (reported, never tuned on). Metrics: accuracy, precision,
recall, F1 and Cohen's kappa of the judge against the human label.
"""
from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from repbend.cache import package_file
from repbend.errors import RepbendError
from repbend.evaluation.types import JudgeItem

SPLITS = ("tune", "test", "all")


@dataclass
class LabelledSet:
    name: str
    field: str                    # which Verdict field is compared with the label: "harmful" | "refused"
    items: list[JudgeItem]
    labels: list[bool]
    source: str
    splits: dict[str, list[int]] | None = None     # fixed tune/test indices (else a seeded half split)
    groups: list[str] | None = None                # per-row group (model) for a per-group breakdown
    group_name: str = "model"
    kinds: list[str] = field(default_factory=list)  # per-row prompt kind, when the set has several


def _read_csv(path: Path) -> list[dict]:
    """CSV rows; leading ``#`` comment lines are skipped (later '#' lines may be inside quoted answers)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    start = 0
    while start < len(lines) and lines[start].startswith("#"):
        start += 1
    return list(csv.DictReader(io.StringIO("".join(lines[start:]))))


def load_jbb() -> LabelledSet:
    rel = "jailbreakbench/data/classifier_comparison.csv"
    rows = _read_csv(package_file("jailbreakbench", "0.1.3", rel))
    items = [JudgeItem(behaviour=r["goal"], response=r["target_response"].strip()) for r in rows]
    labels = [int(r["human_majority"]) == 1 for r in rows]
    return LabelledSet("jbb", "harmful", items, labels, f"jailbreakbench==0.1.3:{rel}")


def _pyrit(name: str, filename: str) -> LabelledSet:
    rel = f"pyrit/datasets/scorer_evals/refusal_scorer/{filename}"
    rows = _read_csv(package_file("pyrit", "1.1.0", rel))
    items = [JudgeItem(behaviour=r["objective"], response=r["assistant_response"].strip()) for r in rows]
    labels = [int(float(r["human_score"])) == 1 for r in rows]
    return LabelledSet(name, "refused", items, labels, f"pyrit==1.1.0:{rel}")


EMBEDDED_FILE = Path(__file__).resolve().parent / "data" / "embedded_models_labelled.jsonl"


def load_embedded(path: str | Path = EMBEDDED_FILE) -> LabelledSet:
    """The hand-labelled answers of the embedded models (first line: a manifest)."""
    p = Path(path)
    rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if "manifest" not in r]
    items = [JudgeItem(behaviour=r["prompt"], response=r["answer"]) for r in rows]
    splits = {s: [i for i, r in enumerate(rows) if r["split"] == s] for s in ("tune", "test")}
    splits["all"] = list(range(len(rows)))
    return LabelledSet("embedded", "harmful", items, [bool(r["label"]) for r in rows],
                       f"repbend:evaluation/judges/data/{p.name}", splits=splits,
                       groups=[r["model"] for r in rows], kinds=[r["kind"] for r in rows])


VALIDATION_SETS: dict[str, Callable[[], LabelledSet]] = {
    "embedded": load_embedded,
    "jbb": load_jbb,
    "pyrit_refusal": lambda: _pyrit("pyrit_refusal", "refusal.csv"),
    "pyrit_refusal_extra": lambda: _pyrit("pyrit_refusal_extra", "refusal_extra.csv"),
}


def load_set(name: str) -> LabelledSet:
    if name not in VALIDATION_SETS:
        raise RepbendError(f"Unknown validation set {name!r}; choose from {', '.join(VALIDATION_SETS)}.")
    return VALIDATION_SETS[name]()


def split_indices(n: int, seed: int = 0) -> dict[str, list[int]]:
    """Seeded half/half split: ``tune`` gets the first ceil(n/2) of a shuffled order, ``test`` the rest."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    half = (n + 1) // 2
    return {"tune": sorted(order[:half]), "test": sorted(order[half:]), "all": list(range(n))}


def binary_metrics(y_true: list[bool], y_pred: list[bool]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive class = True) and Cohen's kappa."""
    if len(y_true) != len(y_pred):
        raise ValueError("y_true and y_pred differ in length")
    n = len(y_true)
    tp = sum(t and p for t, p in zip(y_true, y_pred))
    tn = sum(not t and not p for t, p in zip(y_true, y_pred))
    fp = sum(p and not t for t, p in zip(y_true, y_pred))
    fn = sum(t and not p for t, p in zip(y_true, y_pred))
    acc = (tp + tn) / n if n else 0.0
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    pe = ((tp + fn) * (tp + fp) + (tn + fp) * (tn + fn)) / (n * n) if n else 0.0
    kappa = (acc - pe) / (1 - pe) if pe < 1 else (1.0 if acc == 1 else 0.0)
    return {"n": n, "accuracy": acc, "precision": prec, "recall": rec, "f1": f1, "kappa": kappa,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def set_splits(data: LabelledSet, seed: int = 0) -> dict[str, list[int]]:
    """The set's own fixed split when it has one, else the seeded half split."""
    return data.splits if data.splits is not None else split_indices(len(data.items), seed)


def evaluate_judge(judge: Any, data: LabelledSet, seed: int = 0) -> dict[str, Any]:
    """Score every item once, then metrics on each split (and per group); also the rows the judge got wrong."""
    verdicts = judge.score(data.items)
    preds = [bool(getattr(v, data.field)) for v in verdicts]
    out: dict[str, Any] = {"field": data.field, "source": data.source}
    splits = set_splits(data, seed)
    for split, idx in splits.items():
        out[split] = binary_metrics([data.labels[i] for i in idx], [preds[i] for i in idx])
    if data.groups is not None:
        out["by_" + data.group_name] = {
            g: {split: binary_metrics([data.labels[i] for i in idx if data.groups[i] == g],
                                      [preds[i] for i in idx if data.groups[i] == g]) for split, idx in splits.items()}
            for g in sorted(set(data.groups))}
    out["gibberish_rate"] = sum(v.gibberish for v in verdicts) / max(1, len(verdicts))
    out["predictions"] = preds
    return out


DEFAULT_JUDGES = ("refusal", "default")


def build_judge(name: str, fields: dict | None = None) -> Any:
    """``JUDGES[name](Config(**fields))`` with config errors reported in one line."""
    from repbend.config import validate_data
    from repbend.evaluation.judges import JUDGES

    cls = JUDGES.get(name)
    cfg, errors = validate_data(cls.Config, fields or {})
    if errors:
        raise RepbendError(f"Invalid config for judge {name!r}: " + "; ".join(errors))
    return cls(cfg)


def validate_judges(judges: list[str] | None = None, sets: list[str] | None = None, *, seed: int = 0,
                    judge_configs: dict[str, dict] | None = None, output_dir: str | Path | None = None) -> dict:
    """Score each judge on each human-labelled set; write ``validation.json`` (+ run info) if asked."""
    from repbend.io import atomic_write_json, write_run_info

    judges = list(judges or DEFAULT_JUDGES)
    sets = list(sets or VALIDATION_SETS)
    unknown = [s for s in sets if s not in VALIDATION_SETS]
    if unknown:
        raise RepbendError(f"Unknown validation set(s) {', '.join(unknown)}; choose from {', '.join(VALIDATION_SETS)}.")
    built = {name: build_judge(name, (judge_configs or {}).get(name)) for name in judges}   # fail before any download
    data = {name: load_set(name) for name in sets}
    result: dict[str, Any] = {"seed": seed, "splits": "tune = seeded half used to choose thresholds; test = held out",
                              "sets": {n: {"source": d.source, "field": d.field, "n": len(d.items),
                                           "positives": sum(d.labels)} for n, d in data.items()},
                              "judges": {}}
    for name, judge in built.items():
        per_set = {}
        pooled: dict[str, tuple[list[bool], list[bool]]] = {s: ([], []) for s in SPLITS}
        for set_name, d in data.items():
            r = evaluate_judge(judge, d, seed)
            preds = r.pop("predictions")
            r["errors"] = [i for i, (p, y) in enumerate(zip(preds, d.labels)) if p != y]
            per_set[set_name] = r
            for split, idx in set_splits(d, seed).items():
                pooled[split][0].extend(d.labels[i] for i in idx)
                pooled[split][1].extend(preds[i] for i in idx)
        cfg = getattr(judge, "config", None)
        result["judges"][name] = {"config": cfg.model_dump(mode="json") if cfg is not None else {},
                                  "sets": per_set,
                                  # every set's rows together, each scored on its own label (harmful or refused)
                                  "pooled": {s: binary_metrics(*pooled[s]) for s in SPLITS} if len(data) > 1 else None}
    if output_dir is not None:
        out = Path(output_dir)
        write_run_info(out, seed=seed, judges=judges, sets=sets)
        atomic_write_json(out / "validation.json", result)
    return result
