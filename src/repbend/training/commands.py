"""CLI: ``repbend train`` and ``repbend merge`` (thin layers over the Python API)."""
from __future__ import annotations

from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        config: str = typer.Option(..., "--config", "-c", help="Training config: a YAML file or a shipped name "
                                                               "(train-default, train-qwen2.5-coder-0.5b, ...)."),
        overrides: Optional[list[str]] = typer.Argument(None, help="Overrides like training.max_steps=10 method.params.beta=0.3."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in output_dir from its last good "
                                    "checkpoint (a run stopped before its first checkpoint starts over)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Remove the earlier run (or another kind of run) "
                                       "in output_dir and start over; files repbend did not write are kept."),
    ) -> None:
        """Train a model with RepBend (or another registered method) and save the adapter/weights."""
        from repbend.config import load_config
        from repbend.io import user_path
        from repbend.paths import resolve_config
        from repbend.training import TrainConfig, train

        cfg = load_config(TrainConfig, resolve_config(user_path(config, "--config"), kind="train config"), overrides or [])
        run_dir = train(cfg, resume=resume, overwrite=overwrite)
        typer.echo(f"done: {run_dir}")

    @app.command("merge")
    def merge_cmd(
        adapter: str = typer.Option(..., "--adapter", "-a", help="Adapter folder (a training run folder)."),
        output: str = typer.Option(..., "--output", "-o", help="New folder for the merged full model."),
        base: Optional[str] = typer.Option(None, "--base", help="Base model (default: the one recorded in the adapter)."),
        dtype: str = typer.Option("float32", "--dtype", help="Weights dtype of the merged model: float32, bfloat16, float16."),
    ) -> None:
        """Merge a LoRA adapter into its base model (loadable with AutoModelForCausalLM.from_pretrained)."""
        from repbend.training.merging import merge

        typer.echo(f"merged model: {merge(adapter, output, base=base, dtype=dtype)}")
