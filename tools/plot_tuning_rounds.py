"""Plot tuning rounds 9-17 (docs/TUNING.md): seed-0 trials of protocol v2, and round 11's compute scaling.

    python tools/plot_tuning_rounds.py runs/tune-v2 runs/tune-gpu docs/tuning_rounds.png

Left: validation mean ASR against held-out over-refusal compliance for the seed-0 runs of protocol v2
(the original, round 8's LoRA default r8_reqresp_eps3@s0, rounds 9-16 (LoRA) and round 17 (full
fine-tuning, orange; lr 5e-5 became the default)), with the over-refusal limit.
Right: round 11 (GPU, 3 seeds): direct-request and prefill ASR and the gibberish rate on direct
requests against the training examples seen, relative to the CPU default (60 steps x batch 2); scored
from the cached answers (tools/score_cached_answers.py), as the sweep's evaluation was cut off.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score_cached_answers import score  # noqa: E402

SEED0 = ["original", "r8_reqresp_eps3@s0", "r9_eps3_steps120@s0", "r10_eps5_steps120@s0", "r12_mid_layers@s0",
         "r12_lora_r64@s0", "r13_r64_eps10@s0", "r13_r64_lr3e-4@s0", "r14_r64_or3@s0", "r14_or3@s0",
         "r15_r64_or3_retain@s0", "r15_or3_retain@s0", "r16_r64_or2@s0", "r16_r64_safe_or2@s0",
         "r17_full_lr2e-5@s0", "r17_full_lr5e-5@s0"]
GPU = [("g60_eps3", 1, "60 x 2"), ("g240_eps3", 4, "240 x 2"), ("g240_eps10", 4, "240 x 2, eps 10"),
       ("g240_eps10_a4_bs8", 16, "240 x 8, eps 10, alpha 4")]


def main(v2: Path, gpu: Path, png: Path) -> None:
    recs = {json.loads(l)["name"]: json.loads(l) for l in (v2 / "trials.jsonl").read_text().splitlines() if l.strip()}
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    orig = recs["original"]["results"]["overrefusal"]
    seen: dict[tuple[float, float], int] = {}
    for name in SEED0:
        r = recs[name]["results"]
        x, y = 100 * r["overrefusal"], 100 * r["average_asr"]
        a.scatter(x, y, s=40, color="black" if name == "original" else "tab:orange" if "_full_" in name else "tab:blue")
        point = (round(x, 1), round(y, 1))
        n = seen[point] = seen.get(point, -1) + 1  # a point already labelled: put this label on its left
        a.annotate(name.replace("@s0", ""), (x, y), fontsize=8, xytext=(-4 if n else 4, 3), textcoords="offset points",
                   ha="right" if n else "left")
    a.axvline(100 * (orig - 0.05), color="tab:red", ls="--", lw=1, label="over-refusal limit (original - 5)")
    a.set_xlabel("held-out over-refusal compliance, % (validation, seed 0)")
    a.set_ylabel("mean ASR over 5 attacks, % (validation)")
    a.set_title("Protocol v2, seed 0\nrounds 9-16: LoRA (blue); round 17: full fine-tuning (orange)", fontsize=10)
    a.legend(loc="upper left", fontsize=8)
    table = score(gpu)
    xs, rows = [], {"direct ASR": [], "prefill ASR": [], "gibberish on direct": []}
    for trial, mult, _ in GPU:
        seeds = [v for k, v in table.items() if k.rsplit("_s", 1)[0] == trial]
        xs.append(mult + (0.15 * mult if "eps10" in trial and mult == 4 else 0))
        rows["direct ASR"].append(statistics.mean(s["direct"]["asr"] for s in seeds))
        rows["prefill ASR"].append(statistics.mean(s["prefill"]["asr"] for s in seeds))
        rows["gibberish on direct"].append(statistics.mean(s["direct"]["gibberish"] for s in seeds))
    for (label, ys), m in zip(rows.items(), "os^"):
        b.plot(xs, ys, marker=m, ls="", label=label)
    for x, (_, _, lab), y in zip(xs, GPU, rows["direct ASR"]):
        b.annotate(lab, (x, y), fontsize=8, xytext=(4, 3), textcoords="offset points")
    base = table["original"]["direct"]["asr"]
    b.axhline(base, color="gray", ls=":", lw=1, label="original, direct ASR")
    b.axhline(0.1 * base, color="tab:red", ls="--", lw=1, label="90% below the original's direct ASR")
    b.set_xscale("log", base=2)
    b.set_xlabel("training examples seen, x the CPU default (60 steps x batch 2)")
    b.set_ylabel("% (validation, mean of 3 seeds)")
    b.set_title("Round 11 (GPU): more training, direct requests")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
