"""``keel contract draft``: a data contract read off a user's own table, to review rather than type."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import typer
import yaml

from keel.errors import ConfigError
from keel.settings import load_settings

app = typer.Typer(help="Data contracts for the tabular pipeline (medical_diagnosis) on your own table.",
                  no_args_is_help=True)


@app.command("draft")
def draft_command(
    source: str = typer.Argument(..., help="The table: a path, s3://, http(s):// or builtin:// URI (CSV, Parquet, "
                                           "JSONL), read as `keel run` reads it."),
    target: str = typer.Option(..., "--target", help="The column to predict."),
    output: Path = typer.Option(Path("contract.yaml"), "--output", help="Where to write the contract."),
    force: bool = typer.Option(False, "--force", help="Overwrite --output if it exists."),
) -> None:
    """Draft a contract from SOURCE and print the config that trains on it."""
    from keel.data.draft import config_snippet, draft_contract
    from keel.data.ingest import read_source

    if output.exists() and not force:
        raise ConfigError(f"{output}: exists; pass --force to overwrite it or --output to write elsewhere.")
    with tempfile.TemporaryDirectory(prefix="keel-draft-") as scratch:
        frame, _, _ = read_source(source, Path(scratch), load_settings())
    name = re.sub(r"[^0-9a-z]+", "_", Path(source.rstrip("/")).stem.lower()).strip("_") or "table"
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
    snippet = yaml.safe_dump(config_snippet(output.name, drafted, name.replace("_", "-")), sort_keys=False)
    typer.echo(f"\nReview it, then save this config beside it (e.g. as {output.parent / 'keel.yaml'}):\n")
    typer.echo("  " + snippet.rstrip().replace("\n", "\n  "))
    typer.echo(f"\nand train: keel run medical_diagnosis --param source={source} --config "
               f"{output.parent / 'keel.yaml'}")
