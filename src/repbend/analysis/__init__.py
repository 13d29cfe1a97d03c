"""``repbend analyze``: where a model represents harmfulness, and where and how far bending moved its states.

:func:`analyze` reads held-out harmful, over-refusal-like and benign prompts (:mod:`repbend.analysis.collect`),
keeps each prompt's state at the answer's first position for every chosen layer, and writes into one folder:
separability per layer (difference of means and a logistic probe, harmful vs each safe kind), for a trained
model the distance/cosine of its states to the original's per kind and layer, a logit-lens table, a 2-D PCA at
one layer, plots, ``summary.json``/``summary.md``, ``config.yaml`` and ``run_info.json``.

The original of a trained model: the same network with the adapter switched off (a LoRA adapter, given with
``adapter`` or as an adapter-only ``model`` folder), or, with ``compare_to`` a training run folder (or any
model folder), ``model`` itself (default: the base recorded in the run's ``config.yaml``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pydantic import Field

from repbend.config import Section
from repbend.errors import RepbendError


class AnalyzeConfig(Section):
    model: str | None = Field(None, description="Model: alias, folder, adapter folder or hub id (default: 'default', "
                                                "or with compare_to the run's base model).")
    adapter: str | None = Field(None, description="LoRA adapter folder: analyse model+adapter against model alone.")
    compare_to: str | None = Field(None, description="Trained model folder or training run folder to compare with "
                                                     "`model` (its original).")
    output_dir: str = Field(..., description="Folder for summary.json/md, plots, logit_lens.md, config and run info.")
    layers: str | None = Field(None, description="Hidden states to analyse: all (default), '3,7,15' or '0-30:2'.")
    max_prompts: int = Field(48, ge=0, description="Prompts per kind and part (fit/test); 0 = all.")
    include_contextual: bool = Field(True, description="Harmful prompts include HarmBench's contextual behaviours "
                                                       "(a 200-700-token context before the request); false: standard "
                                                       "behaviours only, as the quick suite evaluates.")
    pca_layer: int | None = Field(None, description="Hidden state of the PCA plot (default: where the original's "
                                                    "difference of means separates harmful from over-refusal best).")
    lens_prompts: int = Field(2, ge=0, description="Test prompts per kind shown in the logit-lens table.")
    lens_top_k: int = Field(3, ge=1, le=20, description="Tokens per layer in the logit-lens table.")
    probe: bool = Field(True, description="Fit the logistic probe too (difference of means is always computed).")
    strip_final_punct: bool = Field(True, description="Drop each prompt's final ?/./! first: no HarmBench behaviour ends "
                                                       "with '?' and nearly every over-refusal prompt does, so with the "
                                                       "punctuation early layers 'separate' them by style, not harm.")
    probe_data: str | None = Field(None, description="Built data folder: fit the read-outs on its training requests "
                                                     "instead of the held-out fit prompts.")
    batch_size: int = Field(8, ge=1, description="Prompts per forward pass.")
    device: str | None = Field(None, description="cpu, cuda, cuda:N (default: CUDA if present).")
    dtype: str | None = Field(None, description="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU).")
    seed: int = Field(0, description="Seed of the prompt subsets and the probe's cross-validation folds.")
    plots: bool = Field(True, description="Write the PNG plots (needs matplotlib).")
    progress: bool = Field(True, description="Show progress bars.")


def _run_base(run: Path) -> str | None:
    import yaml

    cfg = run / "config.yaml"
    if cfg.is_file():
        data = yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}
        m = data.get("model") if isinstance(data, dict) else None
        if isinstance(m, dict):      # a training run's config: model.name
            m = m.get("name")
        if isinstance(m, str):
            return m
    return None


def _is_peft(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def analyze(cfg: AnalyzeConfig) -> dict:
    """Run the analysis described in the module docstring; returns the summary written to ``summary.json``."""
    import gc

    import torch

    from repbend.analysis import collect, metrics, report
    from repbend.io import write_run_info
    from repbend.models.loading import load_model
    from repbend.seeding import seed_everything

    if cfg.adapter and cfg.compare_to:
        raise RepbendError("Give either --adapter (a LoRA adapter on --model) or --compare-to (a trained model), not both.")
    out = Path(cfg.output_dir).expanduser()
    model_spec = cfg.model
    trained_spec: str | None = None
    if cfg.compare_to:
        run = Path(cfg.compare_to).expanduser()
        if not run.is_dir():
            raise RepbendError(f"--compare-to {run} is not a folder; pass a training run folder or a model folder.")
        model_spec = model_spec or _run_base(run)
        if not model_spec:
            raise RepbendError(f"{run} has no config.yaml naming its base model; pass the original as --model.")
        trained_spec = str(run)
    model_spec = model_spec or "default"
    seed_everything(cfg.seed)
    write_run_info(out, cfg, seed=cfg.seed)

    prompts = collect.heldout_prompts(cfg.max_prompts or None, cfg.seed, cfg.include_contextual)
    if cfg.probe_data:
        prompts = [p for p in prompts if p.part == "test"] + collect.training_prompts(cfg.probe_data, cfg.max_prompts or None, cfg.seed)
    if cfg.strip_final_punct:
        prompts = [dataclasses.replace(p, text=collect.strip_final_punct(p.text)) for p in prompts]
    test = [p for p in prompts if p.part == "test"]
    lens_idx = [i for k in collect.KINDS for i in [j for j, p in enumerate(test) if p.kind == k][: cfg.lens_prompts]]

    def run_pass(model, tok, tag: str) -> dict:
        n_states = collect.num_hidden_states(model)
        layers = collect.parse_layers(cfg.layers, n_states)
        states = collect.collect_states(model, tok, prompts, layers, batch_size=cfg.batch_size,
                                        desc=f"{tag} states", progress=cfg.progress)
        test_states = states[[i for i, p in enumerate(prompts) if p.part == "test"]]
        lens = metrics.logit_lens(model, tok, test_states[lens_idx], layers, n_states, cfg.lens_top_k) if lens_idx else []
        return {"states": states, "layers": layers, "num_states": n_states, "lens": lens}

    model, tok = load_model(model_spec, cfg.adapter, device=cfg.device, dtype=cfg.dtype)
    passes: dict[str, dict] = {}
    if _is_peft(model):       # a LoRA model: its original is the same network with the adapter off
        trained_spec = f"{model_spec} + adapter {cfg.adapter}" if cfg.adapter else model_spec
        with model.disable_adapter():
            passes["original"] = run_pass(model, tok, "original")
        passes["trained"] = run_pass(model, tok, "trained")
    else:
        passes["original"] = run_pass(model, tok, "original")
        if trained_spec:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            model, tok2 = load_model(trained_spec, device=cfg.device, dtype=cfg.dtype)
            if collect.num_hidden_states(model) != passes["original"]["num_states"]:
                raise RepbendError(f"{trained_spec} has a different number of layers than {model_spec}; "
                                   f"--compare-to needs a model trained from --model.")
            passes["trained"] = run_pass(model, tok2, "trained")
    del model
    summary = summarise(cfg, model_spec, trained_spec, prompts, passes)
    report.write_outputs(out, summary, passes, prompts, cfg)
    return summary


def summarise(cfg: AnalyzeConfig, model_spec: str, trained_spec: str | None, prompts: list, passes: dict) -> dict:
    """The numbers of ``summary.json`` from the collected states of each pass."""
    import torch

    from repbend.analysis import metrics

    orig = passes["original"]
    layers = orig["layers"]
    fit = [i for i, p in enumerate(prompts) if p.part == "fit"]
    fit_y = torch.tensor([1.0 if prompts[i].kind == "harmful" else 0.0 for i in fit])
    test_by_kind = {k: [i for i, p in enumerate(prompts) if p.part == "test" and p.kind == k] for k in ("harmful", "overrefusal", "benign")}
    if fit_y.sum() < 2 or (1 - fit_y).sum() < 2 or not all(test_by_kind.values()):
        raise RepbendError("Too few prompts to fit and test the read-outs; raise --max-prompts (at least 4).")
    sizes: dict[str, dict[str, int]] = {}
    for p in prompts:
        sizes.setdefault(p.kind, {"fit": 0, "test": 0})[p.part] += 1
    summary: dict[str, Any] = {
        "model": model_spec, "trained": trained_spec, "layers": layers, "num_states": orig["num_states"],
        "position": "last prompt token (where the answer's first token is predicted)",
        "prompts": sizes, "final_punct_stripped": cfg.strip_final_punct, "fit_on": f"training requests of {cfg.probe_data}" if cfg.probe_data else "held-out fit prompts",
        "max_fpr": metrics.MAX_FPR, "separability": {}, "best": {},
    }
    for tag, ps in passes.items():
        s = ps["states"]
        rows = metrics.separability(s[fit], fit_y, s[test_by_kind["harmful"]],
                                    {k: s[test_by_kind[k]] for k in ("overrefusal", "benign")},
                                    probe=cfg.probe, seed=cfg.seed)
        for layer, r in zip(layers, rows):
            r["layer"] = layer
        summary["separability"][tag] = rows
        summary["best"][tag] = {
            read: max(({"layer": r["layer"], **r[read]["overrefusal"]} for r in rows), key=lambda d: (d["auroc"], d["caught_at_5pct"]))
            for read in ("diff_means", "probe") if read in rows[0]}
    if "trained" in passes:
        t = passes["trained"]["states"]
        summary["bending"] = {k: {m: [round(float(v), 6) for v in vals] for m, vals in metrics.bending(orig["states"][ix], t[ix]).items()}
                              for k, ix in test_by_kind.items()}
    pca_layer = cfg.pca_layer if cfg.pca_layer is not None else summary["best"]["original"]["diff_means"]["layer"]
    if pca_layer not in layers:
        raise RepbendError(f"--pca-layer {pca_layer} is not among the analysed hidden states ({layers[0]}..{layers[-1]}); "
                           f"pick one of them or widen --layers.")
    summary["pca_layer"] = pca_layer
    return summary
