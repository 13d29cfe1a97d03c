"""``repbend eval``: evaluate a model with a suite (thin layer over ``repbend.evaluation.runner.evaluate``)."""
from __future__ import annotations

from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        model: str = typer.Option("default", "--model", "-m", help="Model: alias (default), hub id or folder."),
        adapter: Optional[str] = typer.Option(None, "--adapter", "-a", help="LoRA adapter folder to apply."),
        suite: str = typer.Option("quick", "--suite", "-s", help="Suite: quick, full, or a path to a suite YAML."),
        output_dir: str = typer.Option(..., "--output-dir", "-o", help="Folder for results, cache and report."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace results of a different model in the folder."),
        device: Optional[str] = typer.Option(None, "--device", help="Device, e.g. cpu or cuda (default: auto)."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="Model dtype, e.g. float32 or bfloat16."),
        no_report: bool = typer.Option(False, "--no-report", help="Write results.json only (no report.md/plots)."),
        validate_only: bool = typer.Option(False, "--validate-only",
                                           help="Check the suite (all errors at once) and exit without loading a model."),
        overrides: Optional[list[str]] = typer.Argument(
            None, help="Suite overrides as dotted.key=value, e.g. generation.max_new_tokens=32 benchmarks.harmbench.n=8 attacks.1.n_templates=2."),
    ) -> None:
        """Attack a model with a suite's benchmarks and attacks, judge every answer, and write
        results.json, completions.jsonl and report.md. Re-running the same command resumes."""
        from repbend.evaluation.runner import EvalConfig, evaluate
        from repbend.evaluation.suites import load_suite

        s = load_suite(suite, overrides or [])
        if validate_only:
            typer.echo(f"suite {s.name}: OK — {len(s.benchmarks)} benchmark(s), {len(s.attacks)} attack(s), "
                       f"judge {s.judge['name']}")
            return
        from repbend.io import user_path

        cfg = EvalConfig(model=model, adapter=adapter, suite=s, output_dir=str(user_path(output_dir, "--output-dir")),
                         overwrite=overwrite,
                         device=device, dtype=dtype, report=not no_report)
        res = evaluate(cfg)
        typer.echo(f"average ASR {_pct(res.average_asr)}; over-refusal compliance "
                   f"{_pct(res.over_refusal.compliance)}; judge {res.judge_name}")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"

