"""Output formats shared by commands: a table for people, JSON for scripts and CI."""

from __future__ import annotations

import enum
import json
from pathlib import Path
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


def refuse_to_replace(destination: str, force: bool, settings: KeelSettings) -> None:
    """An output is published whole, replacing what is at its destination. A command the user points at a
    directory replaces an earlier output there only when told to, and never what else is there: a destination
    of the user's own, the current directory say, was deleted with everything in it."""
    from keel import storage

    if _holds_the_working_directory(destination):
        raise ConfigError(f"{destination}: is the current directory or holds it; name a directory for the output "
                          "alone (an output replaces its destination whole).")
    if storage.exists(storage.join(destination, storage.MANIFEST), settings):
        if not force:
            raise ConfigError(f"{destination}: holds an earlier output; pass --force to replace it.")
        foreign = storage.foreign_entries(destination, settings)
        if foreign:
            raise ConfigError(f"{destination}: holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, "
                              "which its earlier output did not write; --force replaces the destination whole, so "
                              "move them out first or name another directory.")
    elif storage.holds_anything(destination, settings):
        raise ConfigError(f"{destination}: holds files that are not an earlier Keel output (no {storage.MANIFEST}); "
                          "an output replaces its destination whole, so name a new or empty directory.")


def _holds_the_working_directory(destination: str) -> bool:
    if "://" in destination:
        return False
    target, here = Path(destination).expanduser().resolve(), Path.cwd().resolve()
    return target == here or target in here.parents


def options_as(model: type[OptionsT], command: str, **values: Any) -> OptionsT:
    """A command's options validated as the config section they fill; a bad one is named, as in a config file."""
    from pydantic import ValidationError

    from keel.errors import validation_problems

    try:
        return model(**values)
    except ValidationError as e:
        raise ConfigError(f"{command}: {validation_problems(e, model)}") from e
