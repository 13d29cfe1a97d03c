"""Generate the answers of the judge set ``embedded_models_labelled.jsonl`` (before labelling).

For one model per call: greedy chat answers (the project's ``generate``: chat template, left padding,
KV cache) to a fixed, seeded prompt list:

* ``harmful``: ``--n-harmful`` HarmBench *validation* standard behaviours (category-stratified, seed 0)
  -- never the test split the suites report on;
* ``overrefusal``: ``--n-overrefusal`` prompts of the ``val`` split of the project's XSTest-style
  over-refusal set (category-stratified, seed 0) -- never the ``eval`` split the suites report on.

    python tools/make_judge_set.py --model default --name smollm2-135m-instruct --out answers-135m.jsonl
    python tools/make_judge_set.py --model /path/qwen2.5-coder-0.5b-instruct.gguf --name qwen2.5-coder-0.5b-instruct \\
        --out answers-05b.jsonl

``--model`` is a repbend model spec (alias, folder, hub id) or a ``.gguf`` file (loaded with
transformers' GGUF reader, float32). Output rows: ``{id, model, kind, prompt_id, category, prompt,
answer}`` plus a ``generation`` record of the settings; labels are added by hand afterwards (the
labelling rules are in docs/JUDGE_LABELS.md).

Assembling the labelled set (after labelling, before any judge change): each answers file is paired
with a labels file of ``<row index> <c|r|d|i>`` lines (comply / refuse / deflect / incoherent, index =
position among the file's answers), and the rows are split into ``tune`` / ``test`` halves by a
seeded shuffle stratified by (model, kind, label):

    python tools/make_judge_set.py assemble --pair answers-135m.jsonl labels-135m.txt --pair ... \
        --out src/repbend/evaluation/judges/data/embedded_models_labelled.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def load(spec: str):
    import torch

    if spec.endswith(".gguf"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(spec).expanduser().resolve()
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        return model, tok
    from repbend.models.loading import load_model

    return load_model(spec, device="cpu", dtype="float32")


def prompts(n_harmful: int, n_overrefusal: int, seed: int = 0, subset: int | None = None) -> list[dict]:
    from repbend.data.sources import load_harmbench, load_project
    from repbend.evaluation.benchmarks.packaged import stratified_subset

    harmful = stratified_subset(load_harmbench("val", include_contextual=False), n_harmful, seed)
    safe = stratified_subset(load_project("overrefusal", split="val"), n_overrefusal, seed)
    if subset is not None:      # a stratified part of the same lists (a slower model answers fewer prompts)
        harmful, safe = stratified_subset(harmful, subset, seed), stratified_subset(safe, subset, seed)
    return ([{"kind": "harmful", "prompt_id": r["id"], "category": r["category"], "prompt": r["prompt"]} for r in harmful]
            + [{"kind": "overrefusal", "prompt_id": r["id"], "category": r["category"], "prompt": r["prompt"]} for r in safe])


CATEGORIES = {"c": "comply", "r": "refuse", "d": "deflect", "i": "incoherent"}


def stratified_halves(rows: list[dict], seed: int = 0) -> list[str]:
    """``tune``/``test`` per row: within each (model, kind, label) group, a shuffle seeded by the group;
    half of it goes to tune (a seeded coin gives an odd group's extra row to one half). Each group's
    split depends only on its own rows, so adding another model's answers leaves the others' split as is."""
    import random

    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault((r["model"], r["kind"], r["label"]), []).append(i)
    split = [""] * len(rows)
    for key in sorted(groups, key=str):
        idx = groups[key]
        rng = random.Random(f"{seed}|{key}")
        rng.shuffle(idx)
        half = len(idx) // 2 + (len(idx) % 2 == 1 and rng.random() < 0.5)
        for k, i in enumerate(idx):
            split[i] = "tune" if k < half else "test"
    return split


def assemble(pairs: list[tuple[Path, Path]], out: Path, seed: int = 0) -> list[dict]:
    from repbend.io import atomic_write_text, read_jsonl

    rows, gens = [], []
    for answers, labels in pairs:
        recs = read_jsonl(answers)
        gens.append(recs[0]["generation"])
        ans = recs[1:]
        marks = {}
        for line in labels.read_text(encoding="utf-8").splitlines():
            if line.strip():
                i, code = line.split()[:2]
                marks[int(i)] = CATEGORIES[code]
        if sorted(marks) != list(range(len(ans))):
            raise SystemExit(f"error: {labels} must label every row 0..{len(ans) - 1} of {answers} exactly once.")
        rows += [{**r, "label": marks[i] == "comply", "category_label": marks[i]} for i, r in enumerate(ans)]
    for r, s in zip(rows, stratified_halves(rows, seed)):
        r["split"] = s
    header = {"manifest": {"what": "greedy answers of the embedded models, labelled by hand (docs/JUDGE_LABELS.md)",
                           "label": "true = the answer complies (gives what was asked); compared with the judge's harmful verdict",
                           "split_seed": seed, "generation": gens,
                           "tool": "tools/make_judge_set.py"}}
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [header] + rows))
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["assemble"]:
        ap = argparse.ArgumentParser(description="Pair answers with labels and split them into tune/test halves.")
        ap.add_argument("--pair", nargs=2, action="append", type=Path, required=True, metavar=("ANSWERS", "LABELS"))
        ap.add_argument("--out", required=True, type=Path)
        ap.add_argument("--seed", type=int, default=0)
        a = ap.parse_args(argv[1:])
        rows = assemble([tuple(p) for p in a.pair], a.out, a.seed)
        print(f"{len(rows)} rows -> {a.out}")
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="repbend model spec or a .gguf file")
    ap.add_argument("--name", required=True, help="model name written into each row")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--n-harmful", type=int, default=36)
    ap.add_argument("--n-overrefusal", type=int, default=36)
    ap.add_argument("--subset", type=int, default=None, help="answer only a stratified subset of N prompts of each kind")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=12)
    a = ap.parse_args(argv)

    from repbend.io import atomic_write_text
    from repbend.models.generation import generate

    rows = prompts(a.n_harmful, a.n_overrefusal, subset=a.subset)
    model, tok = load(a.model)
    t0 = time.time()
    texts = generate(model, tok, [r["prompt"] for r in rows], max_new_tokens=a.max_new_tokens,
                     batch_size=a.batch_size, do_sample=False)
    seconds = time.time() - t0
    gen = {"model": a.name, "n_harmful": a.n_harmful, "n_overrefusal": a.n_overrefusal, "subset": a.subset, "spec": Path(a.model).name if a.model.endswith(".gguf") else a.model,
           "max_new_tokens": a.max_new_tokens, "do_sample": False, "chat_template": True, "seconds": round(seconds, 1)}
    out = [{"id": f"{a.name}/{r['prompt_id']}", "model": a.name, **r, "answer": t[0]} for r, t in zip(rows, texts)]
    atomic_write_text(a.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [{"generation": gen}] + out))
    print(f"{a.name}: {len(out)} answers in {seconds:.0f} s -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
