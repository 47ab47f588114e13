"""Users' tables as Keel reads them: one file, or a directory or ``s3://`` prefix of Parquet part files (what
Spark and Ray Data write). Storage copies bytes; what counts as a table, and the DataError that says why
something is not one, lives here."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from keel import storage
from keel.errors import DataError
from keel.settings import KeelSettings

if TYPE_CHECKING:
    import pandas as pd

PART_SUFFIXES = (".parquet", ".pq")


def is_marker(name: str) -> bool:
    """A writer's marker, not data: ``_SUCCESS``, ``.crc`` checksums, ``_temporary/`` and the like."""
    return any(part.startswith(("_", ".")) for part in name.split("/"))


def download_parts(uri: str, dest: Path, settings: KeelSettings) -> Path:
    """The Parquet part files under a directory or ``s3://`` prefix, copied under ``dest`` with their
    relative paths (Hive partitions such as ``day=2026-12-01/`` included). Refuses, before copying anything,
    a prefix that holds other files (a directory is read as Parquet parts only) or no parts at all."""
    names, fetch = storage.list_files(uri, settings)
    data = [name for name in names if not is_marker(name)]
    others = [name for name in data if not name.lower().endswith(PART_SUFFIXES)]
    if others:
        raise DataError(f"{uri}: holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''} besides Parquet "
                        "part files; a directory is read as Parquet parts only (give a CSV or JSONL file by its "
                        "own path).")
    if not names and storage.parse(uri).scheme == "s3" and storage.exists(uri, settings):
        raise DataError(f"{uri}: an object without a file extension; Keel reads .csv, .parquet or .jsonl files, or a "
                        "prefix of Parquet parts.")
    if not data:
        raise DataError(f"{uri}: no Parquet part files there ({'only ' + ', '.join(names[:3]) if names else 'empty'}).")
    for name in data:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        fetch(name, dest / name)
    return dest


def read_parts(uri: str, directory: Path) -> pd.DataFrame:
    """Local Parquet parts as one table, Hive partition keys as columns; a DataError naming ``uri`` when the
    parts disagree on a column's type or cannot be read."""
    import pyarrow as pa
    import pyarrow.dataset

    try:
        return pyarrow.dataset.dataset(directory, format="parquet", partitioning="hive").to_table().to_pandas()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{uri}: its Parquet part files cannot be read as one table ({type(e).__name__}: {e}); "
                        "every part needs the same columns, each with one type.") from e


def read_table(uri: str, settings: KeelSettings, what: str) -> pd.DataFrame:
    """A user's Parquet or CSV file (by suffix), or a directory or prefix of Parquet parts, as a DataFrame; a
    DataError naming it and ``what`` (``"interactions"``, ``"utterances"``) otherwise."""
    import pandas

    with tempfile.TemporaryDirectory(prefix="keel-table-") as scratch:
        if storage.is_directory(uri):
            return read_parts(uri, download_parts(uri, Path(scratch) / "parts", settings))
        local = storage.download(uri, Path(scratch) / storage.filename(uri), settings)
        try:
            return pandas.read_parquet(local) if local.suffix in PART_SUFFIXES else pandas.read_csv(local)
        except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
            raise DataError(f"{uri}: cannot read {what} ({e}).") from e
