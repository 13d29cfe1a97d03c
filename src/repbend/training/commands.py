"""CLI: ``repbend train``, ``repbend merge`` and ``repbend validate`` (thin layers over the Python API)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from repbend.errors import ConfigError

# Config kinds `repbend validate` knows: name -> ("module:Class", top-level keys that identify it).
# Other areas add theirs with register_config_kind() from their own commands.py.
CONFIG_KINDS: dict[str, tuple[str, frozenset[str]]] = {
    "train": ("repbend.training.config:TrainConfig", frozenset({"method", "lora", "full_finetune", "training"})),
}


def register_config_kind(name: str, target: str, keys: set[str]) -> None:
    """Let ``repbend validate`` check another config kind (detected by any of ``keys`` at the top level)."""
    CONFIG_KINDS[name] = (target, frozenset(keys))


def validate_config(path: str | Path, overrides: list[str] | None = None, kind: str | None = None) -> tuple[str, list[str]]:
    """Every problem of a config file at once, without loading models: returns (kind, error lines)."""
    import importlib

    from repbend.config import apply_overrides, read_yaml, validate_data
    from repbend.errors import RepbendError

    data = apply_overrides(read_yaml(path), overrides)
    if kind is None:
        found = [k for k, (_, keys) in CONFIG_KINDS.items() if keys & set(data)]
        if len(found) != 1:
            raise ConfigError(f"Cannot tell which kind of config {path} is ({found or 'no match'}); pass --kind "
                              f"({', '.join(CONFIG_KINDS)}).")
        kind = found[0]
    if kind not in CONFIG_KINDS:
        raise ConfigError(f"Unknown config kind {kind!r}; use one of {', '.join(CONFIG_KINDS)}.")
    module, _, attr = CONFIG_KINDS[kind][0].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    try:
        cfg, errors = validate_data(cls, data)
    except RepbendError as e:  # e.g. an unknown method name raised inside a validator
        return kind, [str(e)]
    if cfg is not None and kind == "train":
        from repbend.training.config import check_train_config

        errors = check_train_config(cfg)
    return kind, errors


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        config: Path = typer.Option(..., "--config", "-c", help="Training config YAML (see configs/train-default.yaml)."),
        overrides: Optional[list[str]] = typer.Argument(None, help="Overrides like training.max_steps=10 method.params.beta=0.3."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in output_dir from its last good "
                                    "checkpoint (a run stopped before its first checkpoint starts over)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Remove the earlier run (or another kind of run) "
                                       "in output_dir and start over; files repbend did not write are kept."),
    ) -> None:
        """Train a model with RepBend (or another registered method) and save the adapter/weights."""
        from repbend.config import load_config
        from repbend.io import user_path
        from repbend.training import TrainConfig, train

        cfg = load_config(TrainConfig, user_path(config, "--config"), overrides or [])
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

    @app.command("validate")
    def validate_cmd(
        config: Path = typer.Argument(..., help="Config YAML to check."),
        overrides: Optional[list[str]] = typer.Argument(None, help="Overrides like training.max_steps=10."),
        kind: Optional[str] = typer.Option(None, "--kind", help="Config kind (default: detected from its top-level keys)."),
    ) -> None:
        """Report every problem of a config file at once, without loading any model."""
        found, errors = validate_config(config, overrides or [], kind)
        if errors:
            for line in errors:
                typer.echo(f"error: {line}", err=True)
            raise typer.Exit(2)
        typer.echo(f"{config}: valid {found} config")
