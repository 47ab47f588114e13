"""Ingest: bring a CSV, Parquet or JSONL file into the artifact store as Parquet.

Parsing happens once, here, so every later stage reads one typed format and
the manifest's digest pins exactly which bytes a model was trained on.
"""

from __future__ import annotations

import csv
import hashlib
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from keel import storage
from keel.data import tables
from keel.data.builtin import is_builtin, write_builtin_csv
from keel.errors import DataError
from keel.settings import KeelSettings

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
DATA_FILE = "data.parquet"
MAX_FIELD_CHARS = 1_000_000  # one cell; anything longer is a broken export, not a feature


def detect_format(uri: str) -> str:
    """The file format from the URI's extension; a DataError listing the accepted ones."""
    suffix = Path(storage.filename(uri).split("?", 1)[0]).suffix.lower()
    if suffix not in FORMATS:
        accepted = ", ".join(sorted(FORMATS))
        raise DataError(f"{uri}: unsupported file extension {suffix or '(none)'!r}; expected one of {accepted}.")
    return FORMATS[suffix]


def sha256_file(path: Path) -> str:
    """The bytes' digest; for a directory of parts, the digest of each part's relative path and digest, so
    it changes when any part is added, removed, renamed or changed."""
    if path.is_dir():
        listing = "".join(f"{part.relative_to(path)}\0{sha256_file(part)}\n"
                          for part in sorted(p for p in path.rglob("*") if p.is_file()))
        return hashlib.sha256(listing.encode()).hexdigest()
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _reject_duplicate_columns(uri: str, columns: list[str]) -> None:
    duplicated = sorted(name for name, n in Counter(columns).items() if n > 1)
    if duplicated:
        raise DataError(f"{uri}: duplicate column name(s) {duplicated}; every column needs a unique name.")


def _looks_numeric(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _reject_null_bytes(uri: str, path: Path) -> None:
    """pandas reads a NUL as part of a value; it is always a sign of binary or corrupted text."""
    with path.open("rb") as f:
        offset = 0
        for chunk in iter(lambda: f.read(1 << 20), b""):
            position = chunk.find(b"\x00")
            if position >= 0:
                raise DataError(f"{uri}: null byte at offset {offset + position}; the file is binary "
                                "or corrupted, not CSV text.")
            offset += len(chunk)


OTHER_DELIMITERS = {";": "semicolon", "\t": "tab", "|": "pipe"}


def _reject_other_delimiters(uri: str, header: list[str]) -> None:
    """A header read as one column holding another delimiter: the file is not comma-separated. Reading it on
    would fail later on every contract column at once; guessing the delimiter could misread the values."""
    if len(header) != 1:
        return
    for delimiter, name in OTHER_DELIMITERS.items():
        if delimiter in header[0]:
            shown = header[0] if len(header[0]) <= 60 else f"{header[0][:60]}..."
            raise DataError(f"{uri}: the header is one column, {shown!r}, split by {name}s: the file looks "
                            f"{name}-separated, and Keel reads comma-separated CSV; re-save it with commas.")


def _read_csv(uri: str, path: Path) -> pd.DataFrame:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), None)
    except UnicodeDecodeError as e:
        raise DataError(f"{uri}: not UTF-8 text (byte {e.start}); re-save the file as UTF-8.") from e
    if not header or not any(cell.strip() for cell in header):
        raise DataError(f"{uri}: empty file or no header row; the first line must name the columns.")
    if all(_looks_numeric(cell) for cell in header):
        raise DataError(f"{uri}: the first row holds values, not column names; add a header row.")
    _reject_other_delimiters(uri, header)
    _reject_duplicate_columns(uri, header)
    _reject_null_bytes(uri, path)
    try:
        return pd.read_csv(path, encoding="utf-8")
    except pd.errors.ParserError as e:
        raise DataError(f"{uri}: malformed CSV ({e}).") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{uri}: not UTF-8 text (byte {e.start}); re-save the file as UTF-8.") from e


def _read_parquet(uri: str, path: Path) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.is_dir():
        return tables.read_parts(uri, path)
    try:
        _reject_duplicate_columns(uri, pq.ParquetFile(path).schema_arrow.names)
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{uri}: not a readable Parquet file ({e}).") from e
    return table.to_pandas()


def _read_jsonl(uri: str, path: Path) -> pd.DataFrame:
    import json

    records: list[dict[str, Any]] = []
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{uri}: line {number} is not valid JSON ({e.msg}).") from e
                if not isinstance(record, dict):
                    raise DataError(f"{uri}: line {number} is not a JSON object; each line must be one record.")
                records.append(record)
    except UnicodeDecodeError as e:
        raise DataError(f"{uri}: not UTF-8 text (byte {e.start}); re-save the file as UTF-8.") from e
    return pd.DataFrame.from_records(records)


READERS = {"csv": _read_csv, "parquet": _read_parquet, "jsonl": _read_jsonl}


def read_table(uri: str, path: Path, file_format: str) -> pd.DataFrame:
    """Parse a local copy of ``uri``; DataErrors name the file and what is wrong."""
    frame = READERS[file_format](uri, path)
    if len(frame.columns) == 0:
        raise DataError(f"{uri}: no columns found.")
    if len(frame) == 0:
        raise DataError(f"{uri}: the file has a header but zero data rows.")
    unnamed = [c for c in frame.columns if not str(c).strip() or str(c).startswith("Unnamed: ")]
    if unnamed:
        raise DataError(f"{uri}: column(s) without a name at position(s) "
                        f"{[list(frame.columns).index(c) for c in unnamed]}; name every column in the header.")
    frame = _numpy_dtypes(frame)
    _reject_unusable_cells(uri, frame)
    return _mixed_as_text(frame)


def _numpy_dtypes(frame: pd.DataFrame) -> pd.DataFrame:
    """Parquet written from pandas or Arrow brings back its extension dtypes: ``category``, nullable ``Int64``,
    ``boolean``, ``string`` with ``pd.NA``. Each becomes the plain dtype a CSV of the same values gets (an integer
    column with a gap is float64, a boolean one with a gap holds None), the dtypes every later step, and MLflow's
    schema inference, know. A categorical's unordered values had no max; a nullable boolean failed the model's
    input example at the register step."""
    for name in frame.columns:
        dtype = frame[name].dtype
        if not pd.api.types.is_extension_array_dtype(dtype) or isinstance(dtype, pd.DatetimeTZDtype) or (
                isinstance(dtype, pd.StringDtype) and dtype.na_value is np.nan):  # pandas' own default text dtype
            continue
        values = frame[name].to_numpy(dtype=object, na_value=None)
        frame[name] = pd.Series(values, index=frame.index, name=name).infer_objects()
    return frame


def _mixed_as_text(frame: pd.DataFrame) -> pd.DataFrame:
    """A JSON column mixing numbers and text becomes text (missing stays missing), so it can be stored
    as Parquet and the contract check can name the values that are not numbers."""
    for name in frame.columns:
        column = frame[name]
        if pd.api.types.is_object_dtype(column):
            kinds = {type(v) for v in column if v is not None and not (isinstance(v, float) and v != v)}
            if len(kinds) > 1:
                frame[name] = column.map(lambda v: v if v is None or (isinstance(v, float) and v != v) else str(v))
    return frame


def _reject_unusable_cells(uri: str, frame: pd.DataFrame) -> None:
    """Nested values and giant strings: valid JSON or Parquet, but no feature a model can use."""
    for name in frame.columns:
        column = frame[name]
        if not (pd.api.types.is_object_dtype(column) or pd.api.types.is_string_dtype(column)):
            continue
        nested = column.map(lambda v: isinstance(v, (list, dict, tuple)) or hasattr(v, "__array__"))
        if nested.any():
            raise DataError(f"{uri}: column {str(name)!r} holds lists or mappings ({int(nested.sum())} row(s), first "
                            f"at data row {int(nested.to_numpy().argmax()) + 1}); flatten them into scalar columns.")
        lengths = column.map(lambda v: len(v) if isinstance(v, str) else 0)
        if lengths.max() > MAX_FIELD_CHARS:
            raise DataError(f"{uri}: column {str(name)!r} data row {int(lengths.to_numpy().argmax()) + 1} holds "
                            f"{int(lengths.max())} characters, over the {MAX_FIELD_CHARS} limit; the export is broken.")


def schema_of(frame: pd.DataFrame) -> dict[str, str]:
    return {str(name): str(dtype) for name, dtype in frame.dtypes.items()}


def read_source(source: str, scratch: Path, settings: KeelSettings) -> tuple[pd.DataFrame, Path, str]:
    """The table at ``source`` as every Keel step sees it (same parsing, same checks), with the local copy it
    was read from (in ``scratch``) and its format."""
    if is_builtin(source):
        local, file_format = write_builtin_csv(source, scratch / "source.csv"), "csv"
    elif storage.is_directory(source):  # Parquet parts, as Spark or Ray Data write a table
        local, file_format = tables.download_parts(source, scratch / "parts", settings), "parquet"
    else:
        storage.parse(source)  # unknown schemes fail before any download
        file_format = detect_format(source)
        local = storage.download(source, scratch / f"source.{file_format}", settings)
    return read_table(source, local, file_format), local, file_format


def ingest(source: str, output_uri: str, settings: KeelSettings) -> dict[str, Any]:
    """Copy ``source`` into ``output_uri`` as ``data.parquet`` with a manifest.

    Args:
        source: a local path, ``file://``, ``s3://``, ``http(s)://`` or ``builtin://`` URI; a local directory or
            ``s3://`` prefix of Parquet part files is read as one table.
        output_uri: where this stage publishes; nothing appears there unless it succeeds.
        settings: endpoints and credentials for reading and writing.

    Returns:
        The published manifest: rows, schema, sha256 of the source bytes, format.
    """
    with storage.staged_output(output_uri, "ingest", settings) as out, \
            tempfile.TemporaryDirectory(prefix="keel-ingest-") as scratch:
        frame, local, file_format = read_source(source, Path(scratch), settings)
        frame.to_parquet(out.path(DATA_FILE), index=False)
        out.manifest.update(source=source, format=file_format, rows=len(frame), schema=schema_of(frame),
                            sha256=sha256_file(local), data=out.uri_of(DATA_FILE))
    return out.manifest
