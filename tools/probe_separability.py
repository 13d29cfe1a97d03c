"""How well does the original model's representation tell harmful requests from safe ones that look harmful?

A thin wrapper over ``repbend analyze`` (src/repbend/analysis, docs/ANALYSIS.md), kept so the commands in
docs/TUNING.md still run: it fits the difference-of-means and logistic read-outs on a built data folder's
training requests (harmful: the ``unsafe`` rows; safe: the benign and over-refusal-train rows) and scores them
on every HarmBench test behaviour against every held-out over-refusal (``eval``) prompt, per hidden state.

    python tools/probe_separability.py -o runs/probe --data runs/demo-v5/data [--strip-final-punct]

is ``repbend analyze --model default -o runs/probe --probe-data runs/demo-v5/data --max-prompts 0
--dtype float32 [--keep-final-punct unless --strip-final-punct]``. What the earlier one-off script also did and this
does not: the validation columns (HarmBench val vs over-refusal val: ``repbend analyze`` fits on those when no
``--probe-data`` is given), the bag-of-tokens baseline and the ``--eval-original`` column (accepted and ignored).
"""
from __future__ import annotations

import argparse
import sys

from repbend.errors import RepbendError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", required=True, help="output folder (the `repbend analyze` files)")
    ap.add_argument("--data", default="runs/demo-v4/data", help="a `repbend data build` folder (train.jsonl)")
    ap.add_argument("--eval-original", default=None, help="ignored (the complied-only column is no longer computed)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strip-final-punct", action="store_true", help="drop each prompt's final ?/./! first")
    a = ap.parse_args(argv)
    from repbend.analysis import AnalyzeConfig, analyze

    try:
        s = analyze(AnalyzeConfig(model=a.model, output_dir=a.out, probe_data=a.data, max_prompts=0, seed=a.seed,
                                  strip_final_punct=a.strip_final_punct, dtype="float32", lens_prompts=1))
    except RepbendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.eval_original:
        print("note: --eval-original is ignored by this wrapper", file=sys.stderr)
    print("state  difference of means: AUROC test  caught@5%FPR test  | logistic probe: AUROC test  caught test")
    for r in s["separability"]["original"]:
        dm, pr = r["diff_means"]["overrefusal"], r.get("probe", {}).get("overrefusal", {"auroc": float("nan"), "caught_at_5pct": float("nan")})
        print(f"{r['layer']:5d}  {dm['auroc']:30.3f}  {100 * dm['caught_at_5pct']:17.1f}  | {pr['auroc']:26.3f}  {100 * pr['caught_at_5pct']:11.1f}")
    print(f"wrote {a.out}/summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
