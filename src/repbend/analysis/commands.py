"""``repbend analyze`` (thin layer over :func:`repbend.analysis.analyze`)."""
from __future__ import annotations

from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("analyze")
    def analyze_cmd(
        model: Optional[str] = typer.Option(None, "--model", "-m", help="Model: alias, folder, adapter folder or hub id "
                                            "(default: 'default', or the --compare-to run's base)."),
        adapter: Optional[str] = typer.Option(None, "--adapter", "-a", help="LoRA adapter: compare model+adapter with model."),
        compare_to: Optional[str] = typer.Option(None, "--compare-to", help="Trained model or training run folder to "
                                                 "compare with --model (the original)."),
        output_dir: str = typer.Option(..., "--output-dir", "-o", help="Folder for the summary, plots and logit lens."),
        layers: Optional[str] = typer.Option(None, "--layers", help="Hidden states: all (default), 3,7,15 or 0-30:2."),
        max_prompts: int = typer.Option(48, "--max-prompts", help="Prompts per kind and part (fit/test); 0 = all."),
        pca_layer: Optional[int] = typer.Option(None, "--pca-layer", help="Hidden state of the PCA plot (default: the "
                                                "original's best difference-of-means layer)."),
        lens_prompts: int = typer.Option(2, "--lens-prompts", help="Test prompts per kind in the logit-lens table."),
        probe_data: Optional[str] = typer.Option(None, "--probe-data", help="Built data folder: fit the read-outs on "
                                                 "its training requests instead of the held-out fit prompts."),
        keep_final_punct: bool = typer.Option(False, "--keep-final-punct", help="Keep each prompt's final ?/./! (by "
                                              "default dropped: it tells the held-out sets apart by style)."),
        no_probe: bool = typer.Option(False, "--no-probe", help="Skip the logistic probe (difference of means only)."),
        no_contextual: bool = typer.Option(False, "--no-contextual", help="Harmful prompts from HarmBench's standard "
                                           "behaviours only (as the quick suite evaluates), without the contextual ones."),
        batch_size: int = typer.Option(8, "--batch-size", help="Prompts per forward pass."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: CUDA if present)."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16 or float16."),
        seed: int = typer.Option(0, "--seed", help="Seed of the prompt subsets and the probe's folds."),
    ) -> None:
        """Look inside a model: where harmful and safe requests separate (per layer), and for a trained model how far
        and where bending moved harmful, over-refusal-like and benign states; logit lens and PCA. Writes summary.json,
        summary.md, logit_lens.md and PNG plots into --output-dir."""
        from repbend.analysis import AnalyzeConfig, analyze
        from repbend.config import load_config

        cfg = load_config(AnalyzeConfig, data={
            "model": model, "adapter": adapter, "compare_to": compare_to, "output_dir": output_dir, "layers": layers,
            "max_prompts": max_prompts, "pca_layer": pca_layer, "lens_prompts": lens_prompts, "probe_data": probe_data,
            "probe": not no_probe, "include_contextual": not no_contextual, "strip_final_punct": not keep_final_punct, "batch_size": batch_size, "device": device, "dtype": dtype, "seed": seed})
        s = analyze(cfg)
        for tag, best in s["best"].items():
            b = best["diff_means"]
            typer.echo(f"{tag}: harmful vs over-refusal-like best at hidden state {b['layer']} (difference of means): "
                       f"AUROC {b['auroc']:.3f}, {100 * b['caught_at_5pct']:.1f}% caught at 5% FPR")
        typer.echo(f"wrote {output_dir}/summary.md")
