from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from keel import storage
from keel.data.ingest import DATA_FILE, ingest
from keel.errors import DataError, StorageError
from keel.settings import KeelSettings
from tests.conftest import artifact_files, small_frame


@pytest.mark.parametrize("name", ["data.csv", "data.parquet", "data.jsonl"])
def test_ingest_each_format(name: str, write_table: Callable[..., Path], settings: KeelSettings) -> None:
    frame = small_frame(50)
    source = write_table(frame, name)
    output = storage.stage_uri(settings, "r1", "ingest")
    manifest = ingest(str(source), output, settings)
    stored = pd.read_parquet(Path(output) / DATA_FILE)
    assert manifest["rows"] == 50 and len(manifest["sha256"]) == 64
    assert list(stored.columns) == list(frame.columns)
    pd.testing.assert_frame_equal(stored[["size", "outcome"]], frame[["size", "outcome"]], check_dtype=False)


def test_builtin_source_needs_no_download(settings: KeelSettings) -> None:
    manifest = ingest("builtin://breast_cancer", storage.stage_uri(settings, "r1", "ingest"), settings)
    assert manifest["rows"] == 569 and "diagnosis" in manifest["schema"]


def test_digest_changes_with_content(write_table: Callable[..., Path], settings: KeelSettings) -> None:
    first = ingest(str(write_table(small_frame(50, seed=1), "a.csv")), storage.stage_uri(settings, "a", "i"), settings)
    second = ingest(str(write_table(small_frame(50, seed=2), "b.csv")), storage.stage_uri(settings, "b", "i"), settings)
    assert first["sha256"] != second["sha256"]


def _bad_file(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("name, content, message", [
    ("empty.csv", b"", "empty file or no header"),
    ("header_only.csv", b"a,b\n", "zero data rows"),
    ("no_header.csv", b"1,2\n3,4\n", "first row holds values"),
    ("dupe.csv", b"a,a\n1,2\n", r"duplicate column name\(s\) \['a'\]"),
    ("latin1.csv", "name\ncafé\n".encode("latin-1"), "not UTF-8"),
    ("ragged.csv", b"a,b\n1,2\n3,4,5,6\n", "malformed CSV"),
    ("corrupt.parquet", b"PAR1 this is not parquet", "not a readable Parquet file"),
    ("bad.jsonl", b'{"a": 1}\n{"a": \n', "line 2 is not valid JSON"),
    ("list.jsonl", b"[1, 2]\n", "line 1 is not a JSON object"),
    ("data.xlsx", b"whatever", "unsupported file extension '.xlsx'"),
    ("unnamed.csv", b"a,\n1,2\n", "without a name"),
])
def test_bad_files_are_rejected_by_name_and_leave_nothing(
        tmp_path: Path, settings: KeelSettings, name: str, content: bytes, message: str) -> None:
    path = _bad_file(tmp_path, name, content)
    with pytest.raises(DataError, match=message) as raised:
        ingest(str(path), storage.stage_uri(settings, "r1", "ingest"), settings)
    assert name in str(raised.value)
    assert artifact_files(settings) == []


@pytest.mark.parametrize("source, error", [
    ("missing.csv", "no such file"),
    ("ftp://host/data.csv", "unknown URI scheme 'ftp'"),
    ("http://127.0.0.1:9/data.csv", "cannot download"),
    ("builtin://nope", "no such bundled dataset"),
])
def test_unreadable_sources(settings: KeelSettings, source: str, error: str) -> None:
    with pytest.raises((DataError, StorageError), match=error):
        ingest(source, storage.stage_uri(settings, "r1", "ingest"), settings)
    assert artifact_files(settings) == []


def _parts(root: Path, frame: pd.DataFrame) -> Path:
    """The table as a Spark-like writer leaves it: Hive partitions by outcome, two parts in one, and the
    markers (_SUCCESS, .crc) that are not data."""
    for outcome, rows in frame.groupby("outcome"):
        partition = root / f"outcome={outcome}"
        partition.mkdir(parents=True)
        halves = [rows.iloc[: len(rows) // 2], rows.iloc[len(rows) // 2:]] if outcome == frame["outcome"].iloc[0] \
            else [rows]
        for number, half in enumerate(halves):
            half.drop(columns=["outcome"]).to_parquet(partition / f"part-{number:05d}.snappy.parquet", index=False)
            (partition / f".part-{number:05d}.snappy.parquet.crc").write_bytes(b"\x00crc")
    (root / "_SUCCESS").write_bytes(b"")
    return root


def test_a_directory_of_parquet_parts_is_one_table_with_its_partition_keys(
        tmp_path: Path, settings: KeelSettings) -> None:
    frame = small_frame(60)
    source = _parts(tmp_path / "table", frame)
    manifest = ingest(str(source), storage.stage_uri(settings, "r1", "ingest"), settings)
    stored = pd.read_parquet(Path(storage.stage_uri(settings, "r1", "ingest")) / DATA_FILE)
    assert manifest["rows"] == 60 and manifest["format"] == "parquet"
    expected = frame.sort_values(["size", "outcome"]).reset_index(drop=True)
    got = stored[list(frame.columns)].sort_values(["size", "outcome"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False, check_categorical=False)
    # The digest covers every part: the same parts give the same digest, a changed part another.
    again = ingest(str(source), storage.stage_uri(settings, "r2", "ingest"), settings)
    first_part = sorted(source.rglob("part-*.parquet"))[0]
    pd.read_parquet(first_part).assign(size=lambda f: f["size"] + 1).to_parquet(first_part, index=False)
    changed = ingest(str(source), storage.stage_uri(settings, "r3", "ingest"), settings)
    assert again["sha256"] == manifest["sha256"] != changed["sha256"]


def test_a_directory_that_is_not_parquet_parts_is_refused_by_name_and_leaves_nothing(
        tmp_path: Path, settings: KeelSettings) -> None:
    output = storage.stage_uri(settings, "r1", "ingest")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no Parquet part files there \(empty\)"):
        ingest(str(tmp_path / "empty"), output, settings)
    mixed = _parts(tmp_path / "mixed", small_frame(20))
    small_frame(5).to_csv(mixed / "extra.csv", index=False)
    with pytest.raises(DataError, match=r"mixed: holds extra.csv besides Parquet part files"):
        ingest(str(mixed), output, settings)
    disagreeing = _parts(tmp_path / "disagreeing", small_frame(20))
    part = sorted(disagreeing.rglob("part-*.parquet"))[-1]
    pd.read_parquet(part).assign(size="large").to_parquet(part, index=False)  # text where the others have numbers
    with pytest.raises(DataError, match=r"disagreeing: its Parquet part files cannot be read as one table .*"
                                        r"each with one type"):
        ingest(str(disagreeing), output, settings)
    assert not storage.exists(output, settings) and artifact_files(settings) == []


def test_parquet_from_pandas_keeps_no_extension_dtypes_past_ingest(tmp_path: Path, settings: KeelSettings) -> None:
    """category, nullable Int64 and boolean, and pd.NA strings come out as the same values read from a CSV do."""
    frame = pd.DataFrame({"visits": pd.array([1, None, 3], dtype="Int64"), "count": pd.array([1, 2, 3], dtype="Int64"),
                          "vip": pd.array([True, None, False], dtype="boolean"),
                          "note": pd.array(["a", None, "c"], dtype="string[pyarrow]"),
                          "colour": pd.Series(["red", "blue", "red"], dtype="category")})
    frame.to_parquet(tmp_path / "typed.parquet")
    ingest(str(tmp_path / "typed.parquet"), storage.stage_uri(settings, "r1", "ingest"), settings)
    stored = pd.read_parquet(Path(storage.stage_uri(settings, "r1", "ingest")) / DATA_FILE)
    assert {name: str(dtype) for name, dtype in stored.dtypes.items()} == {
        "visits": "float64", "count": "int64", "vip": "object", "note": "str", "colour": "str"}
    assert stored["vip"].tolist() == [True, None, False] and stored["visits"].isna().tolist() == [False, True, False]
