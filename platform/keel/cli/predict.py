"""``keel predict``: score a whole table with a registered model (batch inference)."""

from __future__ import annotations

import typer

from keel.cli.output import OUTPUT_OPTION, OutputFormat, options_as, print_json, refuse_to_replace
from keel.errors import ConfigError
from keel.settings import load_settings


def predict_command(
    model_uri: str = typer.Argument(..., help="models:/NAME@ALIAS or models:/NAME/N."),
    source: str = typer.Argument(..., help="The table to score: a path, s3:// or http(s):// URI (CSV, Parquet, "
                                           "JSONL), read as `keel run` reads a source."),
    destination: str = typer.Argument(..., help="A directory (path or s3://) for predictions.parquet (with --ray, "
                                                "a predictions/ directory of parts) and manifest.json."),
    keep: list[str] | None = typer.Option(None, "--keep", help="An input column to copy beside the predictions; "
                                                               "repeatable (default: every column)."),
    k: int = typer.Option(10, "--k", help="Items per user, for a recommender."),
    input_column: str | None = typer.Option(None, "--input-column",
                                            help="The file's text or user-id column, when not `text` / `user_id` "
                                                 "(e.g. MovieLens' userId)."),
    batch_rows: int = typer.Option(50_000, "--batch-rows", help="Rows per forward pass."),
    on_ray: bool = typer.Option(False, "--ray", help="Stream a Parquet file, directory or s3:// prefix through "
                                                     "scoring actors on the Ray cluster (KEEL_RAY_ADDRESS, or a "
                                                     "local Ray) instead of reading it whole here."),
    workers: int | None = typer.Option(None, "--workers", help="With --ray: the most scoring actors (default: one "
                                                               "per CPU of the cluster)."),
    force: bool = typer.Option(False, "--force",
                               help="Replace an earlier output at DESTINATION (never files it did not write)."),
    output: OutputFormat = OUTPUT_OPTION,
) -> None:
    """Score every row of SOURCE; nothing appears at DESTINATION unless every row scored."""
    from keel.batch import PredictConfig, score_table

    settings = load_settings()
    refuse_to_replace(destination, force, settings)
    if workers is not None and not on_ray:
        raise ConfigError("--workers sizes the --ray engine's actor pool; add --ray, or leave --workers out.")
    predict = options_as(PredictConfig, "keel predict", keep=keep, k=k, batch_rows=batch_rows,
                         input_column=input_column, engine="ray" if on_ray else "local", workers=workers)
    manifest = score_table(model_uri, source, destination, settings, predict)
    if output is OutputFormat.json:
        print_json(manifest)
        return
    typer.echo(f"Scored {manifest['rows']} rows with {manifest['model_uri']} in {manifest['duration_s']:.1f} s")
    predicted = manifest["columns"][manifest["kept_columns"]:]
    typer.echo(f"Wrote {manifest['predictions']}: {manifest['kept_columns']} input column(s) "
               f"kept, then {', '.join(predicted)}")
