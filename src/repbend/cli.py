"""The ``repbend`` command line: a thin layer that parses arguments and calls the Python API.

Each area registers its commands from its own ``commands.py`` (``register(app)``), so adding a
command never touches this file. Heavy imports (torch, transformers) happen inside the commands, so
``repbend --help`` is instant. User errors (:class:`RepbendError`) print one line and exit non-zero.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Optional

import typer

from repbend.errors import RepbendError

app = typer.Typer(
    name="repbend",
    help="Representation bending for LLM safety: build data, train RepBend and baselines, attack, judge, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# Modules that add commands to ``app``; each has ``register(app: typer.Typer) -> None``.
COMMAND_MODULES = (
    "repbend.models.commands",
    "repbend.data.commands",
    "repbend.training.commands",
    "repbend.evaluation.commands",
    "repbend.evaluation.judges.commands",
    "repbend.evaluation.report_commands",
    "repbend.pipeline.commands",
    "repbend.analysis.commands",
)


@app.callback()
def _root() -> None:
    """Representation bending for LLM safety: build data, train RepBend and baselines, attack, judge, report."""


@app.command("version")
def version() -> None:
    """Print the versions of repbend and the libraries it runs on."""
    from repbend.io import git_commit, package_versions

    for k, v in {**package_versions(), "git_commit": git_commit() or "n/a"}.items():
        typer.echo(f"{k}: {v}")


@app.command("validate")
def validate(
    config: str = typer.Argument(..., help="Config YAML to check: a path or a shipped name (train-default, "
                                           "data-default, pipeline-quick, tune-default, quick)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Overrides like training.max_steps=10."),
    kind: Optional[str] = typer.Option(None, "--kind", help="Config kind: train, data, suite, pipeline, sweep "
                                                            "(default: detected from its top-level keys)."),
) -> None:
    """Report every problem of a config file at once, without loading any model."""
    from repbend.validate import validate_config

    found, errors = validate_config(config, overrides or [], kind)
    if errors:
        for line in errors:
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(2)
    typer.echo(f"{config}: valid {found} config")


for _mod in COMMAND_MODULES:
    importlib.import_module(_mod).register(app)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(args=argv)  # standalone mode: usage errors print a short message and exit 2
    except RepbendError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted; finished work is kept (re-run the same command to resume)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
