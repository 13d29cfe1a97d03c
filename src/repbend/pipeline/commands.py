"""``repbend demo`` and ``repbend compare`` (thin layer over :func:`repbend.pipeline.jobs.run_pipeline`)."""
from __future__ import annotations

from typing import Optional

import typer


def _load(profile_or_path: str, output_dir: Optional[str], overrides: list[str], **values):
    """The pipeline config of a profile (``quick`` -> configs/pipeline-quick.yaml) or a YAML path, the user's
    ``key=value`` overrides, then the options given on the command line (``values``, typed; None = not given)."""
    from repbend.config import load_config
    from repbend.paths import resolve_config
    from repbend.pipeline.jobs import PipelineConfig

    name = profile_or_path if profile_or_path.endswith((".yaml", ".yml")) else f"pipeline-{profile_or_path}"
    values = {"output_dir": output_dir, **values}
    return load_config(PipelineConfig, resolve_config(name, kind="pipeline profile"), overrides,
                       values={k: v for k, v in values.items() if v is not None})


def model_values(model: Optional[str], profile: str, output_dir: Optional[str]) -> dict:
    """Pipeline values for ``--model``: an embedded model with its shipped train config (``train-default`` for the
    default model, ``train-<alias>`` for the others) and, unless ``-o`` is given, its own output folder."""
    if model is None:
        return {}
    from repbend.errors import RepbendError
    from repbend.models.embedded import EMBEDDED, embedded_model
    from repbend.paths import resolve_config

    m = embedded_model(model)
    if m is None:
        names = ", ".join(a for e in EMBEDDED for a in e.aliases)
        raise RepbendError(f"--model {model!r} is not an embedded model ({names}); for another model write a pipeline "
                           f"YAML with its model and train_config (start from configs/train-default.yaml and set "
                           f"method.params.target_start/target_window for its depth) and pass it with -p.")
    alias = m.aliases[-1]   # the descriptive one (not "default")
    train = "train-default" if m is EMBEDDED[0] else f"train-{alias}"
    resolve_config(train, kind="train config")   # shipped with repbend; fails clearly if not
    values = {"model": alias, "train_config": train}
    if output_dir is None and not profile.endswith((".yaml", ".yml")):
        values["output_dir"] = f"runs/demo-{profile}-{alias}"
    return values


def _csv(text: Optional[str], what: str, cast=str) -> Optional[list]:
    """A comma-separated option as a list (``--seeds 0,1,2``); None when not given."""
    if not text:
        return None
    from repbend.errors import RepbendError

    try:
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RepbendError(f"{what} {text!r}: give comma-separated {cast.__name__} values, e.g. 0,1,2.") from None


def _finish(res: dict, out: str) -> None:
    typer.echo("")
    typer.echo(res["markdown"])
    typer.echo(f"Everything is in {out} (report: {out}/report/summary.md).")


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        profile: str = typer.Option("quick", "--profile", "-p",
                                    help="quick (quick suite, 1 seed, ~20 min on 2 CPU cores) or full (full suite, 3 seeds), or a pipeline YAML."),
        output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", help="Output folder (default: the profile's, runs/demo-<profile>)."),
        seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated training seeds, e.g. 0,1,2 (mean ± std is reported)."),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="Another embedded model (`repbend models`) with "
                                                                        "its shipped train config, e.g. smollm2-135m."),
        overrides: Optional[list[str]] = typer.Argument(None, help="Pipeline overrides as key=value, e.g. train_overrides=[training.max_steps=50]."),
    ) -> None:
        """Run the whole RepBend pipeline on the embedded default model: build data, evaluate the original,
        train RepBend, evaluate it, and write a side-by-side report. Finished stages are skipped on a re-run."""
        from repbend.pipeline.jobs import run_pipeline

        mv = model_values(model, profile, output_dir)
        cfg = _load(profile, mv.pop("output_dir", output_dir), overrides or [], seeds=_csv(seeds, "--seeds", int), **mv)
        _finish(run_pipeline(cfg), cfg.output_dir)

    @app.command("compare")
    def compare(
        methods: str = typer.Option("repbend,circuit_breakers,rmu,npo", "--methods",
                                    help="Comma-separated methods to train and compare (same data, budget, seed, suite)."),
        config: str = typer.Option("quick", "--config", "-c", help="Pipeline profile (quick, full) or a pipeline YAML."),
        suite: Optional[str] = typer.Option(None, "--suite", "-s", help="Evaluation suite (overrides the profile's)."),
        output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", help="Output folder (default runs/compare-<profile>)."),
        seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated training seeds."),
        overrides: Optional[list[str]] = typer.Argument(None, help="Pipeline overrides as key=value."),
    ) -> None:
        """Train several methods on the same built data with the same step budget and seed, evaluate the
        original and every trained model with the same suite and judge, and write the side-by-side report.
        Finished methods are not retrained."""
        from repbend.pipeline.jobs import run_pipeline

        ov = list(overrides or [])
        if output_dir is None and not any(o.startswith("output_dir=") for o in ov):
            output_dir = f"runs/compare-{config if not config.endswith('.yaml') else 'custom'}"
        cfg = _load(config, output_dir, ov, methods=_csv(methods, "--methods"), suite=suite,
                    seeds=_csv(seeds, "--seeds", int))
        _finish(run_pipeline(cfg), cfg.output_dir)

    @app.command("tune")
    def tune(
        sweep: str = typer.Argument("tune-default", help="Sweep YAML (name under configs/ or a path)."),
        output_dir: str = typer.Option("runs/tune", "--output-dir", "-o", help="Folder for the trials and the ranking."),
        workers: int = typer.Option(1, "--workers", "-w", min=1, help="Trials run in parallel (useful on a GPU)."),
        device: Optional[str] = typer.Option(None, "--device", help="Device for evaluation (default: cuda if available)."),
        time_budget: Optional[float] = typer.Option(None, "--time-budget", help="Seconds after which no new trial starts."),
        rejudge: Optional[str] = typer.Option(None, "--rejudge", help="Only re-score the saved completions with this judge "
                                                                      "(e.g. default), then rank."),
        report_only: bool = typer.Option(False, "--report-only", help="Only rank the finished trials and write the report."),
        only: Optional[str] = typer.Option(None, "--only", help="Comma-separated trial names to run (others are left)."),
        use: Optional[str] = typer.Option(None, "--use", help="Record and mark the trial actually adopted when it is not "
                                                              "the rule's choice (no trial met every limit)."),
    ) -> None:
        """Hyper-parameter search on validation data (HarmBench validation behaviours, the over-refusal set's
        `val` part): train each trial (per seed with `seeds:`), evaluate it with the tuning suite, rank, and write
        tuning.md / tuning.json / tuning.png. Finished trials are skipped on a re-run."""
        from pathlib import Path

        from repbend.pipeline import tune as t

        out = Path(output_dir)
        if rejudge:
            t.rejudge(out, {"name": rejudge})
        elif not report_only:
            t.run_sweep(t.load_sweep(sweep), out, workers=workers, device=device, time_budget_s=time_budget,
                        only=only.split(",") if only else None)
        res = t.report(out, use=use)
        chosen = res["chosen"]
        typer.echo((out / "tuning.md").read_text())
        typer.echo(f"chosen{' (fallback)' if chosen and chosen.get('fallback') else ''}: {chosen['name']} "
                   f"{chosen['overrides']}" if chosen else "no trial meets the limits")
