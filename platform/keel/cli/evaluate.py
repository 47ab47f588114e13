"""``keel evaluate``: a registered model on labeled rows, against what it was registered on."""

from __future__ import annotations

from typing import Any

import typer

from keel.cli.output import OUTPUT_OPTION, OutputFormat, options_as, print_json, print_table, refuse_to_replace
from keel.settings import load_settings

DEGRADED_EXIT_CODE = 3  # not 1, which every error exits with: CI can tell "worse" from "could not check"


def evaluate_command(
    model_uri: str = typer.Argument(..., help="models:/NAME@ALIAS or models:/NAME/N of a classifier (tabular or "
                                              "text) or a recommender."),
    source: str = typer.Argument(..., help="A labeled table: the model's input columns and its label column (a "
                                           "text classifier's: text and intent), as a path, s3:// or http(s):// URI "
                                           "(CSV, Parquet, JSONL). Rows whose label is empty are left out and "
                                           "counted. A recommender's: the interactions that came in since, in its "
                                           "training file's columns."),
    destination: str = typer.Argument(..., help="A directory (path or s3://) for performance.json, plots, "
                                                "report.html and manifest.json."),
    tolerance: float = typer.Option(0.05, "--tolerance", help="How much worse than its registered value the "
                                                              "promotion metric may be."),
    min_rows: int = typer.Option(50, "--min-rows", help="The fewest labeled rows (a recommender: "
                                                                        "users with new interactions) a verdict is "
                                                                        "given on."),
    label_column: str | None = typer.Option(None, "--label-column",
                                            help="The file's label column, when not the model's own (its target, "
                                                 "or a text classifier's intent)."),
    input_column: str | None = typer.Option(None, "--input-column",
                                            help="A text classifier: the file's text column, when not `text`."),
    fail_if_degraded: bool = typer.Option(False, "--fail-if-degraded",
                                          help=f"Exit {DEGRADED_EXIT_CODE} when the verdict is degraded."),
    force: bool = typer.Option(False, "--force",
                               help="Replace an earlier output at DESTINATION (never files it did not write)."),
    output: OutputFormat = OUTPUT_OPTION,
) -> None:
    """Score SOURCE's labeled rows and judge them by the rules the version was promoted on."""
    from keel.monitor.performance import PerformanceConfig, check_performance

    settings = load_settings()
    refuse_to_replace(destination, force, settings)
    config = options_as(PerformanceConfig, "keel evaluate", tolerance=tolerance, min_rows=min_rows,
                        label_column=label_column, input_column=input_column)
    manifest = check_performance(model_uri, source, destination, settings, config)
    if output is OutputFormat.json:
        print_json(manifest)
    else:
        print_verdict(manifest)
    if fail_if_degraded and manifest["verdict"] == "degraded":
        raise typer.Exit(DEGRADED_EXIT_CODE)


def print_verdict(manifest: dict[str, Any]) -> None:
    from keel.evaluate import shown_metric
    from keel.monitor.ranking import LEFT_OUT, new_users_line

    if "left_out" in manifest:
        left_out = ", ".join(f"{count} {LEFT_OUT[reason]}" for reason, count in manifest["left_out"].items() if count)
    else:
        left_out = f"{manifest['unlabeled_rows']} without a label" if manifest["unlabeled_rows"] else ""
    typer.echo(f"{manifest['model_uri']} on {manifest['measured_on']} of {manifest['source']}"
               + (f" (left out: {left_out})" if left_out else ""))
    registered = manifest["registered"]
    rows = [[name, shown_metric(now), shown_metric(registered.get(name)), _change(now, registered.get(name))]
            for name, now in manifest["metrics"].items()]
    print_table(["metric", "now", "registered", "change"], rows)
    typer.echo(f"Verdict: {manifest['verdict'].upper()} (promotion metric {manifest['metric']})")
    for reason in manifest["failures"] or manifest["reasons"]:
        typer.echo(f"  {reason}")
    if manifest.get("new_users", {}).get("users"):
        typer.echo(f"New users: {new_users_line(manifest['new_users'])}")
    typer.echo(f"MLflow run {manifest['mlflow_run_id']}; report: {manifest['report_html']}")


def _change(now: float | None, then: float | None) -> str:
    return "" if now is None or then is None else f"{now - then:+.4f}"
