"""``repbend report RUN...``: rebuild one run's report, or put several runs side by side."""
from __future__ import annotations

from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report_cmd(
        runs: list[str] = typer.Argument(..., help="Evaluation folders written by `repbend eval` (each holds results.json)."),
        output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", help="Where to write; default: the run folder "
                                                 "(one run) or ./repbend-compare (several runs)."),
        labels: Optional[str] = typer.Option(None, "--labels", "-l", help="Comma-separated run names for tables and plots "
                                             "(default: folder names), e.g. original,repbend,npo."),
    ) -> None:
        """One run: (re)write report.md and its PNG plots. Several runs: compare.md with a side-by-side
        table, a grouped ASR bar chart and an ASR-vs-capability (Pareto) plot."""
        from repbend.errors import RepbendError
        from repbend.evaluation.report import write_report
        from repbend.evaluation.report_compare import compare_runs
        from repbend.evaluation.results import Results

        names = [s.strip() for s in labels.split(",")] if labels else None
        if len(runs) == 1 and not names:
            path = write_report(Results.load(runs[0]), output_dir or runs[0])
        else:
            if names is not None and len(names) != len(runs):
                raise RepbendError(f"--labels has {len(names)} names for {len(runs)} runs; give one per run.")
            path = compare_runs(runs, output_dir or "repbend-compare", names)
        typer.echo(f"wrote {path}")
