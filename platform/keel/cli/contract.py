"""``keel contract draft``: a data contract read off a user's own table, to review rather than type."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import typer
import yaml

from keel.errors import ConfigError
from keel.settings import KeelSettings, load_settings

app = typer.Typer(help="Data contracts for the tabular pipeline (medical_diagnosis) on your own table.",
                  no_args_is_help=True)


@app.command("draft")
def draft_command(
    source: str = typer.Argument(..., help="The table: a path, s3://, http(s):// or builtin:// URI (CSV, Parquet, "
                                           "JSONL), read as `keel run` reads it."),
    target: str = typer.Option(..., "--target", help="The column to predict."),
    output: Path = typer.Option(Path("contract.yaml"), "--output", help="Where to write the contract."),
    force: bool = typer.Option(False, "--force", help="Overwrite --output if it exists."),
    model_name: str = typer.Option("", "--model-name", help="The registered model the config trains (default: "
                                                            "the file's name)."),
) -> None:
    """Draft a contract from SOURCE and print the config that trains on it."""
    from keel.data.draft import config_snippet, draft_contract
    from keel.data.ingest import read_source

    if output.exists() and not force:
        raise ConfigError(f"{output}: exists; pass --force to overwrite it or --output to write elsewhere.")
    from keel.config import MODEL_NAME_PATTERN

    if model_name and not re.match(MODEL_NAME_PATTERN, model_name):
        raise ConfigError(f"--model-name {model_name!r}: expected letters, digits, '.', '_' or '-', starting with a "
                          "letter or digit, as MLflow's registry names go.")
    settings = load_settings()
    with tempfile.TemporaryDirectory(prefix="keel-draft-") as scratch:
        frame, _, _ = read_source(source, Path(scratch), settings)
    name = re.sub(r"[^0-9a-z]+", "_", Path(source.rstrip("/")).stem.lower()).strip("_") or "table"
    model_name = model_name or name.replace("_", "-")
    drafted = draft_contract(frame, target, name, source)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    partial.write_text(drafted.to_yaml(source, len(frame)))
    partial.replace(output)  # whole or not at all: an interrupted write leaves no half contract
    contract = drafted.contract
    typer.echo(f"wrote {output}: {len(contract.columns) - 1} feature column(s) and target {target!r} "
               f"(classes {sorted(drafted.class_counts)}), {len(frame)} rows")
    for column, why in drafted.left_out.items():
        typer.echo(f"  left out {column}: {why}")
    for column, note in drafted.notes.items():
        typer.echo(f"  look at {column}: {note}")
    taken = _registered_for_another_table(model_name, drafted.contract.features,
                                          sorted(str(label) for label in drafted.class_counts), settings)
    for line in taken:
        typer.echo(f"  {line}")
    snippet = yaml.safe_dump(config_snippet(output.name, drafted, model_name), sort_keys=False)
    typer.echo(f"\nReview it, then save this config beside it (e.g. as {output.parent / 'keel.yaml'}):\n")
    typer.echo("  " + snippet.rstrip().replace("\n", "\n  "))
    typer.echo(f"\nand train: keel run medical_diagnosis --param source={source} --config "
               f"{output.parent / 'keel.yaml'}")


def _registered_for_another_table(model_name: str, features: list[str], classes: list[str],
                                  settings: KeelSettings) -> list[str]:
    """Lines saying why ``model_name`` is a poor name for this table's model: a champion of that name reads other
    columns or predicts other classes. The name defaults to the file's, so `titanic.parquet` after `titanic.csv`,
    or another table exported under last year's name, landed in one registered model, and the gate held each
    such version back as a change to the served API. None when the name is free, its champion reads this table
    alike, or no registry is there to ask (a local store not created yet)."""
    from keel import tracking

    uri = settings.mlflow_tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return []
    client = tracking.mlflow_client(settings)
    champion = tracking.champion_version(client, model_name)
    if champion is None:
        return []
    inputs, predicted = tracking.served_schema(f"models:/{model_name}/{champion}")
    changes = [f"  {what}: {change}" for what, change in (("columns", tracking.column_changes(inputs, features)),
                                                         ("classes", tracking.column_changes(predicted, classes)))
               if change]
    if not changes:
        return []
    return [f"note: models:/{model_name} is registered already; against its champion v{champion}, a model of this "
            "table", *changes, "the gate would hold such a version back as a change to the served API: pass "
            "--model-name to train a model of its own."]
