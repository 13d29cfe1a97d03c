"""``repbend judge validate``: agreement of judges with human labels."""
from __future__ import annotations

from typing import Optional

import typer


def _parse_overrides(items: list[str]) -> dict[str, dict]:
    """``judge.field=value`` -> {judge: {field: value}} (the config override parser; values parsed as YAML)."""
    from repbend.config import apply_overrides
    from repbend.errors import RepbendError

    for item in items:
        key, sep, _ = item.partition("=")
        judge, dot, field = key.partition(".")
        if not sep or not dot or not judge or not field:
            raise RepbendError(f"--set {item!r} must look like judge.field=value (e.g. default.min_words=5).")
    return apply_overrides({}, items)


def print_validation(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Judge agreement with human labels (seed {result['seed']}; test = held-out half)")
    for col in ("judge", "set", "label", "split", "n", "acc", "prec", "rec", "F1", "kappa"):
        table.add_column(col, justify="left" if col in ("judge", "set", "label", "split") else "right")
    def row(judge: str, name: str, label: str, split: str, m: dict) -> None:
        table.add_row(judge, name, label, split, str(m["n"]), f"{m['accuracy']:.3f}",
                      f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", f"{m['kappa']:.3f}")

    for judge, jr in result["judges"].items():
        for set_name, sr in jr["sets"].items():
            for split in ("tune", "test", "all"):
                row(judge, set_name, sr["field"], split, sr[split])
            for group, per_split in (sr.get("by_model") or {}).items():
                for split in ("tune", "test", "all"):
                    row(judge, f"{set_name} / {group}", sr["field"], split, per_split[split])
        for split, m in (jr.get("pooled") or {}).items():
            row(judge, "pooled (all sets)", "own label", split, m)
        table.add_section()
    Console(width=140).print(table)


def register(app: typer.Typer) -> None:
    judge_app = typer.Typer(help="Judges: validate them against human labels.", no_args_is_help=True)

    @judge_app.command("validate")
    def validate_cmd(
        judge: Optional[list[str]] = typer.Option(None, "--judge", "-j", metavar="NAME", help="Judge to score (repeatable); default: refusal and default."),
        dataset: Optional[list[str]] = typer.Option(None, "--dataset", "-d", metavar="SET", help="Labelled set (repeatable): embedded, jbb, pyrit_refusal, pyrit_refusal_extra; default: all."),
        set_: Optional[list[str]] = typer.Option(None, "--set", metavar="JUDGE.FIELD=VALUE", help="Judge config override judge.field=value (repeatable), e.g. llm_classifier.model=/path."),
        seed: int = typer.Option(0, "--seed", help="Seed of the tune/test half split."),
        output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", metavar="DIR", help="Folder for validation.json (and run_info.json)."),
    ) -> None:
        """Score judges against the human-labelled sets (answers of the embedded models: harmful =
        engaged, also per model; JBB classifier comparison: harmful; PyRIT refusal sets: refused) and
        print accuracy, precision, recall, F1 and Cohen's kappa on the tune half, the held-out test
        half and all rows."""
        from repbend.evaluation.judges.validate import validate_judges

        result = validate_judges(judge, dataset, seed=seed, judge_configs=_parse_overrides(set_ or []),
                                 output_dir=output_dir)
        print_validation(result)
        if output_dir:
            typer.echo(f"wrote {output_dir}/validation.json")

    app.add_typer(judge_app, name="judge")
