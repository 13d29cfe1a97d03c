"""The ``repbend`` command line: a thin layer that parses arguments and calls the Python API.

Each area registers its commands from its own ``commands.py`` (``register(app)``), so adding a
command never touches this file. Heavy imports (torch, transformers) happen inside the commands, so
``repbend --help`` is instant. User errors (:class:`RepbendError`) print one line and exit non-zero.
"""
from __future__ import annotations

import importlib
import os
import sys

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


for _mod in COMMAND_MODULES:
    try:
        importlib.import_module(_mod).register(app)
    except ModuleNotFoundError as _e:  # an area not written yet must not break the others
        if _e.name != _mod:
            raise


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
