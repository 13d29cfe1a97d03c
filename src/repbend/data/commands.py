"""``repbend data ...``: build the training set, show a built one, list the data sources."""
from __future__ import annotations

from typing import Optional

import typer

data_app = typer.Typer(help="Training data: build it from real sources on-policy, inspect it, list sources.",
                       no_args_is_help=True, rich_markup_mode=None)


@data_app.command("build")
def build_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Model to defend (alias, folder or hub id); overrides the config's model."),
    output: str = typer.Option("data/built", "--output", "-o", help="Folder for the built dataset."),
    config: Optional[str] = typer.Option(None, "--config", "-c",
                                         help="Build config YAML (default: built-in defaults = configs/data-default.yaml)."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace a different (or earlier) build in the output folder and start over."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
    overrides: Optional[list[str]] = typer.Argument(
        None, help="Config overrides as dotted.key=value, e.g. generation.batch_size=8 harmful.0.max_rows=50."),
) -> None:
    """Read the sources, decontaminate against the evaluation sets, let the model answer every training
    request, and write train.jsonl, val.jsonl and manifest.json. Re-running the same command resumes."""
    from repbend.data.build import build_dataset
    from repbend.data.build_config import load_build_config

    from repbend.io import user_path

    out = user_path(output, "--output")
    cfg = load_build_config(str(user_path(config, "--config")) if config is not None else None,
                            list(overrides or []) + ([f"model={model}"] if model else []))
    manifest = build_dataset(cfg, out, overwrite=overwrite, progress=not no_progress)
    tr, va = manifest["counts"]["train"], manifest["counts"]["val"]
    typer.echo(f"built {output}: train {tr['total']} rows {tr['by_split']}, val {va['total']} rows {va['by_split']}; "
               f"decontamination dropped {manifest['decontamination']['dropped']}; "
               f"{manifest['timings']['total_s']:.0f} s")


@data_app.command("show")
def show_cmd(
    path: str = typer.Argument(..., help="A built dataset folder (output of repbend data build)."),
    examples: int = typer.Option(2, "--examples", "-n", min=0, help="Examples printed per split and kind."),
    width: int = typer.Option(160, "--width", min=20, help="Characters shown of each request/response."),
) -> None:
    """Print a built dataset's manifest summary (counts, decontamination, truncation, model, inputs)
    and a few examples of each split."""
    from repbend.data.show import show
    from repbend.io import user_path

    show(str(user_path(path, "PATH")), examples=examples, width=width)


@data_app.command("sources")
def sources_cmd() -> None:
    """List the registered data sources with their package, version and license."""
    from rich.console import Console
    from rich.table import Table

    from repbend.data.sources import SOURCES

    table = Table("name", "package", "license", "description")
    for name in SOURCES.names():
        cls = SOURCES.get(name)
        pkg = f"{cls.package}=={cls.version}" if hasattr(cls, "package") else "-"
        table.add_row(name, pkg, cls.license, cls.description)
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
