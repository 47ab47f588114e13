"""Output formats shared by commands: a table for people, JSON for scripts and CI."""

from __future__ import annotations

import enum
import json
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from pydantic import BaseModel

from keel.errors import ConfigError

if TYPE_CHECKING:
    from keel.settings import KeelSettings

OptionsT = TypeVar("OptionsT", bound=BaseModel)


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


def refuse_earlier_output(destination: str, force: bool, settings: KeelSettings) -> None:
    """A command that publishes to a directory the user names replaces an earlier output only when told to."""
    from keel import storage

    if storage.exists(storage.join(destination, storage.MANIFEST), settings) and not force:
        raise ConfigError(f"{destination}: holds an earlier output; pass --force to replace it.")


def options_as(model: type[OptionsT], command: str, **values: Any) -> OptionsT:
    """A command's options validated as the config section they fill; a bad one is named, as in a config file."""
    from pydantic import ValidationError

    from keel.errors import validation_problems

    try:
        return model(**values)
    except ValidationError as e:
        raise ConfigError(f"{command}: {validation_problems(e, model)}") from e
