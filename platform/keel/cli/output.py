"""Output formats shared by commands: a table for people, JSON for scripts and CI."""

from __future__ import annotations

import enum
import json
from typing import Any

import typer


class OutputFormat(str, enum.Enum):
    table = "table"
    json = "json"


OUTPUT_OPTION = typer.Option(OutputFormat.table, "--output", "-o", help="table for people, json for scripts.")


def print_json(payload: Any) -> None:
    typer.echo(json.dumps(payload, indent=2, sort_keys=True, default=str))


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    widths = [max(len(str(v)) for v in column) for column in zip(headers, *rows, strict=False)]
    for line in [headers, *rows]:
        typer.echo("  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=False)).rstrip())
