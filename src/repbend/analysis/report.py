"""Writing the analysis folder: summary.json, summary.md, logit_lens.md and the plots."""
from __future__ import annotations

from pathlib import Path

from repbend.io import atomic_write_json, atomic_write_text

KIND_TEXT = {"harmful": "harmful", "overrefusal": "over-refusal-like", "benign": "benign"}


def _pca_points(summary: dict, passes: dict, prompts: list) -> tuple[dict, list[float]]:
    from repbend.analysis import metrics

    j = passes["original"]["layers"].index(summary["pca_layer"])
    test = [i for i, p in enumerate(prompts) if p.part == "test"]
    base = passes["original"]["states"][test, j]
    mean, comps, explained = metrics.pca_2d(base)
    points = {}
    for tag, ps in passes.items():
        x = ps["states"][test, j]
        points[tag] = {k: ((x[[n for n, i in enumerate(test) if prompts[i].kind == k]] - mean) @ comps.T).numpy()
                       for k in KIND_TEXT}
    return points, [float(e) for e in explained]


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def summary_markdown(summary: dict) -> str:
    s = summary
    lines = [f"# Inside {s['model']}" + (f" vs {s['trained']}" if s.get("trained") else ""), "",
             f"States at the {s['position']}; hidden state 0 = embeddings, {s['num_states'] - 1} = after the final norm.",
             "Prompts (fit / test): " + ", ".join(f"{KIND_TEXT[k]} {v['fit']}/{v['test']}" for k, v in s["prompts"].items())
             + f". Read-outs fitted on the {s['fit_on']}; every score below is on the test prompts."
             + (" Each prompt's final ?/./! was dropped (a style cue that tells the held-out sets apart)."
                if s.get("final_punct_stripped") else " Prompts kept their final punctuation."), ""]
    for tag, best in s["best"].items():
        for read, b in best.items():
            name = "difference of means" if read == "diff_means" else "logistic probe"
            lines.append(f"- {tag}, {name}: best at hidden state {b['layer']}: AUROC {_fmt(b['auroc'])} harmful vs "
                         f"over-refusal-like, {100 * b['caught_at_5pct']:.1f}% of harmful caught with <= "
                         f"{100 * s['max_fpr']:.0f}% over-refusal-like flagged.")
    lines += ["", "## Separability per hidden state (AUROC; caught % at 5% FPR vs over-refusal-like)", ""]
    tags = list(s["separability"])
    has_probe = "probe" in s["separability"]["original"][0]
    head = ["state"]
    for tag in tags:
        head += [f"{tag} DM vs OR", f"{tag} DM caught", f"{tag} DM vs benign"]
        if has_probe:
            head += [f"{tag} probe vs OR", f"{tag} probe caught"]
    if "bending" in s:
        head += [f"moved {KIND_TEXT[k]} (rel.)" for k in s["bending"]] + [f"cos {KIND_TEXT[k]}" for k in s["bending"]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for j, layer in enumerate(s["layers"]):
        cells = [str(layer)]
        for tag in tags:
            r = s["separability"][tag][j]
            cells += [_fmt(r["diff_means"]["overrefusal"]["auroc"]), f"{100 * r['diff_means']['overrefusal']['caught_at_5pct']:.1f}",
                      _fmt(r["diff_means"]["benign"]["auroc"])]
            if has_probe:
                cells += [_fmt(r["probe"]["overrefusal"]["auroc"]), f"{100 * r['probe']['overrefusal']['caught_at_5pct']:.1f}"]
        if "bending" in s:
            cells += [_fmt(v["relative"][j]) for v in s["bending"].values()] + [_fmt(v["cosine"][j]) for v in s["bending"].values()]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "DM = difference of means (fit-set harmful mean - safe mean); OR = over-refusal-like; "
              "moved = mean ||trained - original|| / ||original|| of the same prompt's state; cos = mean cosine.",
              "", "Figures: separability.png" + (", bending.png" if "bending" in s else "")
              + f", pca_layer{s['pca_layer']}.png; logit lens: logit_lens.md.", ""]
    return "\n".join(lines)


def lens_markdown(summary: dict, passes: dict, prompts: list, lens_prompts: int) -> str:
    test = [p for p in prompts if p.part == "test"]
    chosen = [p for k in KIND_TEXT for p in [q for q in test if q.kind == k][:lens_prompts]]
    lines = ["# Logit lens", "", "Top tokens (probability) decoded from each hidden state at the answer's first position "
             "(final norm + LM head), per prompt" + (": original, then trained." if "trained" in passes else "."), ""]
    for n, p in enumerate(chosen):
        text = p.text.replace("\n", " ")
        lines += [f"## {KIND_TEXT[p.kind]}: {text[:160]}{'...' if len(text) > 160 else ''}", "",
                  "| state | " + " | ".join(passes) + " |", "|---|" + "---|" * len(passes)]
        for j, layer in enumerate(summary["layers"]):
            cells = [", ".join(f"`{t!r}` {v:.2f}".replace("|", "\\|") for t, v in ps["lens"][n][j]) for ps in passes.values()]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_outputs(out: Path, summary: dict, passes: dict, prompts: list, cfg) -> None:
    if cfg.plots:
        from repbend.analysis import plots

        points, explained = _pca_points(summary, passes, prompts)
        summary["pca_explained"] = explained
        plots.separability(summary, out / "separability.png")
        if "bending" in summary:
            plots.bending(summary, out / "bending.png")
        title = summary["model"] + (" (filled) vs trained (hollow)" if "trained" in passes else "")
        plots.pca(points, explained, summary["pca_layer"], title, out / f"pca_layer{summary['pca_layer']}.png")
    atomic_write_text(out / "logit_lens.md", lens_markdown(summary, passes, prompts, cfg.lens_prompts))
    atomic_write_text(out / "summary.md", summary_markdown(summary))
    atomic_write_json(out / "summary.json", summary)
