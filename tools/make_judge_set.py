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


def prompts(n_harmful: int, n_overrefusal: int, seed: int = 0) -> list[dict]:
    from repbend.data.sources import load_harmbench, load_project
    from repbend.evaluation.benchmarks.packaged import stratified_subset

    harmful = stratified_subset(load_harmbench("val", include_contextual=False), n_harmful, seed)
    safe = stratified_subset(load_project("overrefusal", split="val"), n_overrefusal, seed)
    return ([{"kind": "harmful", "prompt_id": r["id"], "category": r["category"], "prompt": r["prompt"]} for r in harmful]
            + [{"kind": "overrefusal", "prompt_id": r["id"], "category": r["category"], "prompt": r["prompt"]} for r in safe])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="repbend model spec or a .gguf file")
    ap.add_argument("--name", required=True, help="model name written into each row")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--n-harmful", type=int, default=36)
    ap.add_argument("--n-overrefusal", type=int, default=36)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=12)
    a = ap.parse_args(argv)

    from repbend.io import atomic_write_text
    from repbend.models.generation import generate

    rows = prompts(a.n_harmful, a.n_overrefusal)
    model, tok = load(a.model)
    t0 = time.time()
    texts = generate(model, tok, [r["prompt"] for r in rows], max_new_tokens=a.max_new_tokens,
                     batch_size=a.batch_size, do_sample=False)
    seconds = time.time() - t0
    gen = {"model": a.name, "spec": Path(a.model).name if a.model.endswith(".gguf") else a.model,
           "max_new_tokens": a.max_new_tokens, "do_sample": False, "chat_template": True, "seconds": round(seconds, 1)}
    out = [{"id": f"{a.name}/{r['prompt_id']}", "model": a.name, **r, "answer": t[0]} for r, t in zip(rows, texts)]
    atomic_write_text(a.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [{"generation": gen}] + out))
    print(f"{a.name}: {len(out)} answers in {seconds:.0f} s -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
