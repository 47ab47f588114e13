"""The malformed-data corpus: what each file is, how it is made, and what the error must say.

``python -m tests.corpus.malformed`` rewrites the files under
``tests/corpus/malformed/``; a test checks the committed files match this
module, so the corpus and its expectations cannot drift apart. Every file is
judged against :data:`CONTRACT` (four columns, target ``label``).
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

DIRECTORY = Path(__file__).parent / "malformed"
ROWS = 40
CONTRACT = {
    "name": "corpus", "target": "label",
    "thresholds": {"min_rows": 20, "max_duplicate_fraction": 0.2, "min_class_fraction": 0.1},
    "columns": {
        "age": {"dtype": "int", "min": 0, "max": 120},
        "income": {"dtype": "float", "min": 0, "max": 10_000_000},
        "city": {"dtype": "category"},
        "label": {"dtype": "category", "allowed": ["yes", "no"]},
    },
}
GIANT = 1_100_000  # characters in one field: over ingest's MAX_FIELD_CHARS


def good_frame(rows: int = ROWS) -> pd.DataFrame:
    """A valid table: the base every malformed file is one defect away from."""
    return pd.DataFrame({
        "age": [20 + (i * 7) % 60 for i in range(rows)],
        "income": [1000.0 + 137.5 * i for i in range(rows)],
        "city": [["Oslo", "Lyon", "Porto", "Graz"][i % 4] for i in range(rows)],
        "label": ["yes" if i % 3 else "no" for i in range(rows)],
    })


def _csv(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode()


def _jsonl(frame: pd.DataFrame) -> bytes:
    return "".join(json.dumps(record) + "\n" for record in frame.to_dict(orient="records")).encode()


def _parquet(frame: pd.DataFrame | pa.Table) -> bytes:
    table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _with(**changes: object) -> pd.DataFrame:
    """The good frame with some cells changed: ``changes`` maps ``column`` to {row: value} or a whole list."""
    frame = good_frame().astype(object)
    for column, values in changes.items():
        if isinstance(values, dict):
            cells = frame[column].tolist()
            for row, value in values.items():
                cells[row] = value
            frame[column] = pd.Series(cells, dtype=object)
        else:
            frame[column] = values
    return frame


def _without(column: str) -> pd.DataFrame:
    return good_frame().drop(columns=[column])


def _single_class() -> pd.DataFrame:
    return good_frame().assign(label="yes")


def _duplicates() -> pd.DataFrame:
    return pd.concat([good_frame(10)] * 4, ignore_index=True)


@dataclass(frozen=True)
class Case:
    """One malformed file: its name, its bytes, and fragments its error message must contain."""

    name: str
    make: Callable[[], bytes]
    expect: tuple[str, ...]


def _text(name: str, text: str, *expect: str, encoding: str = "utf-8") -> Case:
    return Case(name, lambda: text.encode(encoding), expect)


GOOD_CSV = good_frame().to_csv(index=False)
CASES: list[Case] = [
    # ---- CSV: structure and encoding
    _text("empty.csv", "", "empty file or no header row"),
    _text("whitespace_only.csv", "  \n\n \n", "empty file or no header row"),
    _text("header_only.csv", "age,income,city,label\n", "zero data rows"),
    _text("no_header.csv", "\n".join(GOOD_CSV.splitlines()[1:]).replace("Oslo", "1").replace("Lyon", "2")
          .replace("Porto", "3").replace("Graz", "4").replace("yes", "1").replace("no", "0") + "\n",
          "first row holds values, not column names"),
    _text("truncated_mid_row.csv", GOOD_CSV[:GOOD_CSV.rindex("\n", 0, -1) + 5], "column 'city'", "missing value"),
    _text("unclosed_quote.csv", GOOD_CSV + '31,1.0,"Oslo,yes\n' + GOOD_CSV.splitlines()[1] + "\n", "malformed CSV"),
    _text("ragged_rows.csv", GOOD_CSV + "31,1.0,Oslo,yes,extra,fields\n", "malformed CSV"),
    _text("latin1.csv", GOOD_CSV.replace("Graz", "Genève"), "not UTF-8", encoding="latin-1"),
    _text("utf16.csv", GOOD_CSV, "not UTF-8", encoding="utf-16"),
    Case("binary_garbage.csv", lambda: bytes(range(256)) * 8, ("not UTF-8",)),
    Case("parquet_bytes.csv", lambda: _parquet(good_frame()), ("not UTF-8",)),
    _text("null_bytes.csv", GOOD_CSV.replace("Lyon", "Ly\x00on"), "null byte"),
    _text("duplicate_columns.csv", GOOD_CSV.replace("city", "age", 1), "duplicate column name(s) ['age']"),
    _text("unnamed_column.csv", GOOD_CSV.replace("city", "", 1), "without a name at position(s) [2]"),
    _text("semicolon_delimited.csv", good_frame().to_csv(index=False, sep=";"), "looks semicolon-separated",
          "re-save it with commas"),
    _text("renamed_header.csv", GOOD_CSV.replace("age,income", "Age,Income", 1),
          "2 contract column(s) are in the data under near names", "'Age' -> 'age', 'Income' -> 'income'"),
    _text("tab_delimited.csv", good_frame().to_csv(index=False, sep="\t"), "looks tab-separated"),
    _text("giant_field.csv", GOOD_CSV.replace("Porto", "P" * GIANT, 1), "column 'city'", "characters"),
    # ---- CSV: contents
    Case("mixed_types.csv", lambda: _csv(_with(age={3: "thirty"})), ("column 'age'", "not numbers", "thirty")),
    Case("fractional_int.csv", lambda: _csv(_with(age={5: 30.5})), ("column 'age'", "not integers")),
    Case("thousands_separator.csv", lambda: _csv(_with(income={2: "1,000.5"})), ("column 'income'", "not numbers")),
    Case("missing_target_values.csv", lambda: _csv(_with(label={1: None, 4: None})),
         ("column 'label'", "2 missing value(s)")),
    Case("nan_target.csv", lambda: _csv(_with(label={0: "NaN"})), ("column 'label'", "missing value")),
    Case("no_target_column.csv", lambda: _csv(_without("label")), ("column 'label': missing from the data",)),
    Case("no_feature_column.csv", lambda: _csv(_without("income")), ("column 'income': missing from the data",)),
    Case("unknown_label.csv", lambda: _csv(_with(label={7: "maybe"})), ("column 'label'", "outside", "maybe")),
    Case("out_of_range.csv", lambda: _csv(_with(age={0: -4, 1: 300})), ("column 'age'", "2 value(s) outside")),
    Case("infinite.csv", lambda: _csv(_with(income={3: "inf"})), ("column 'income'", "infinite")),
    Case("missing_feature_values.csv", lambda: _csv(_with(city={2: None})), ("column 'city'", "missing value")),
    Case("single_class.csv", lambda: _csv(_single_class()), ("column 'label'", "min_class_fraction")),
    Case("too_few_rows.csv", lambda: _csv(good_frame(5)), ("5 row(s), fewer than min_rows 20",)),
    Case("duplicate_rows.csv", lambda: _csv(_duplicates()), ("duplicate row(s)",)),
    # ---- other extensions
    _text("data.txt", GOOD_CSV, "unsupported file extension '.txt'"),
    _text("no_extension", GOOD_CSV, "unsupported file extension '(none)'"),
    _text("data.xlsx", GOOD_CSV, "unsupported file extension '.xlsx'"),
    # ---- Parquet
    Case("empty.parquet", lambda: b"", ("not a readable Parquet file",)),
    Case("truncated.parquet", lambda: _parquet(good_frame())[:300], ("not a readable Parquet file",)),
    Case("csv_text.parquet", lambda: GOOD_CSV.encode(), ("not a readable Parquet file",)),
    Case("zero_rows.parquet", lambda: _parquet(good_frame().head(0)), ("zero data rows",)),
    Case("zero_columns.parquet", lambda: _parquet(pa.table({})), ("no columns found",)),
    Case("duplicate_columns.parquet", lambda: _parquet(pa.Table.from_arrays(
        [pa.array([1, 2]), pa.array([3, 4])], names=["age", "age"])), ("duplicate column name(s) ['age']",)),
    Case("string_ages.parquet", lambda: _parquet(_with(age=[f"{20 + i}y" for i in range(ROWS)]).astype(str)),
         ("column 'age'", "not numbers")),
    Case("no_target.parquet", lambda: _parquet(_without("label")), ("column 'label': missing from the data",)),
    Case("null_target.parquet", lambda: _parquet(good_frame().assign(
        label=[None if i % 5 == 0 else "yes" if i % 3 else "no" for i in range(ROWS)])),
        ("column 'label'", "missing value")),
    Case("unknown_label.parquet", lambda: _parquet(good_frame().assign(label="perhaps")),
         ("column 'label'", "outside", "perhaps")),
    Case("out_of_range.parquet", lambda: _parquet(good_frame().assign(income=-1.0)), ("column 'income'", "outside")),
    Case("infinite.parquet", lambda: _parquet(good_frame().assign(income=float("inf"))),
         ("column 'income'", "infinite")),
    Case("list_cells.parquet", lambda: _parquet(good_frame().assign(city=[["Oslo"]] * ROWS)),
         ("column 'city'", "lists or mappings")),
    Case("giant_field.parquet", lambda: _parquet(good_frame().assign(city=["x" * GIANT] + ["Oslo"] * (ROWS - 1))),
         ("column 'city'", "characters")),
    Case("single_class.parquet", lambda: _parquet(_single_class()), ("column 'label'", "min_class_fraction")),
    # ---- JSONL
    _text("empty.jsonl", "", "no columns found"),
    _text("blank_lines.jsonl", "\n\n\n", "no columns found"),
    Case("invalid_json.jsonl", lambda: _jsonl(good_frame()) + b'{"age": 30, "income": \n', ("line 41", "not valid JSON")),
    Case("truncated.jsonl", lambda: _jsonl(good_frame())[:-20], ("line 40", "not valid JSON")),
    Case("array_lines.jsonl", lambda: b"[1, 2, 3, 4]\n" * 30, ("line 1 is not a JSON object",)),
    Case("latin1.jsonl", lambda: _jsonl(good_frame()).replace(b"Graz", "Genève".encode("latin-1")), ("not UTF-8",)),
    Case("mixed_types.jsonl", lambda: _jsonl(_with(age={3: "old"})), ("column 'age'", "not numbers", "old")),
    Case("no_target.jsonl", lambda: _jsonl(_without("label")), ("column 'label': missing from the data",)),
    Case("null_target.jsonl", lambda: _jsonl(_with(label={2: None})), ("column 'label'", "missing value")),
    Case("unknown_label.jsonl", lambda: _jsonl(_with(label={2: "dunno"})), ("column 'label'", "outside", "dunno")),
    Case("nested_object.jsonl", lambda: _jsonl(_with(city={4: {"name": "Oslo"}})),
         ("column 'city'", "lists or mappings", "first at data row 5")),
    Case("out_of_range.jsonl", lambda: _jsonl(_with(age={9: 999})), ("column 'age'", "outside")),
    Case("giant_field.jsonl", lambda: _jsonl(_with(city={0: "y" * GIANT})), ("column 'city' data row 1", "characters")),
    Case("single_class.jsonl", lambda: _jsonl(_single_class()), ("column 'label'", "min_class_fraction")),
]


def write_corpus(directory: Path = DIRECTORY) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        (directory / case.name).write_bytes(case.make())


if __name__ == "__main__":
    write_corpus(Path(sys.argv[1]) if len(sys.argv) > 1 else DIRECTORY)
