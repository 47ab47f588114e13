"""The ray batch engine on a real local Ray: Ray Data streams a directory of Parquet parts through scoring
actors, and the output is what the model answers for every row (in no promised order: joined on a kept id),
or nothing at all."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from keel.batch import PredictConfig, score_table
from keel.batch.distributed import PARTS_DIRECTORY
from keel.errors import DataError
from keel.predictor import Predictor
from keel.settings import KeelSettings, load_settings
from tests.stages import register_small_model
from tests.unit.test_batch import MODEL_URI, rows_to_score

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KeelSettings, Predictor]]:
    """A registered small model and a local Ray both tests share (one Ray start, not one per call)."""
    import ray

    patch = pytest.MonkeyPatch()
    patch.setenv("KEEL_HOME", str(tmp_path_factory.mktemp("batch-ray") / ".keel"))
    settings = load_settings()
    uris = register_small_model(settings, "batch-ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield settings, Predictor.load(Path(uris["train"]))
    finally:
        ray.shutdown()
        patch.undo()


def write_parts(rows: pd.DataFrame, directory: Path, sizes: list[int]) -> Path:
    """``rows`` as consecutive Parquet part files, as a data lake partitions a table."""
    directory.mkdir()
    start = 0
    for number, size in enumerate(sizes):
        rows.iloc[start:start + size].to_parquet(directory / f"part-{number:03d}.parquet", index=False)
        start += size
    return directory


def test_every_row_of_every_part_scores_as_the_model_scores_it(registered: tuple[KeelSettings, Predictor],
                                                                tmp_path: Path) -> None:
    settings, predictor = registered
    rows = rows_to_score(250)
    source = write_parts(rows, tmp_path / "table", [100, 100, 50])
    manifest = score_table(MODEL_URI, str(source), str(tmp_path / "out"), settings,
                           PredictConfig(keep=["customer"], batch_rows=64, engine="ray", workers=2))
    scored = pd.read_parquet(tmp_path / "out" / PARTS_DIRECTORY).set_index("customer")
    expected = predictor.predict(rows).set_axis(rows["customer"])
    assert sorted(scored.index) == sorted(rows["customer"])  # each row once
    pd.testing.assert_frame_equal(scored.loc[expected.index], expected, check_dtype=False, atol=1e-6,
                                  check_names=False)
    assert manifest["engine"] == "ray" and manifest["rows"] == 250 and manifest["model_uri"] == "models:/small-model/1"
    assert manifest["columns"] == ["customer", *expected.columns] and len(manifest["source_files"]) == 3
    assert (tmp_path / "out" / "manifest.json").exists()


def test_a_bad_value_in_one_part_leaves_nothing_and_names_the_row_by_its_kept_id(
        registered: tuple[KeelSettings, Predictor], tmp_path: Path) -> None:
    settings, _ = registered
    rows = rows_to_score(250).astype({"size": str})  # every part holds size as text, which the model parses
    rows.loc[150, "size"] = "twelve"
    source = write_parts(rows, tmp_path / "table", [100, 100, 50])
    config = PredictConfig(keep=["customer"], batch_rows=64, engine="ray", workers=2)
    with pytest.raises(DataError, match=r"table, the row with customer='c-150': column 'size': 1 value\(s\) are not "
                                        r"numbers"):
        score_table(MODEL_URI, str(source), str(tmp_path / "out"), settings, config)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.predict-*"))

    # parts that disagree on a column's type, and a table without a column the model reads: refused by name
    # before any actor starts
    rows_to_score(20).to_parquet(tmp_path / "table" / "part-001.parquet", index=False)  # size as numbers
    with pytest.raises(DataError, match=r"table: its part files do not agree on the columns' types \(.*size.*\)"):
        score_table(MODEL_URI, str(source), str(tmp_path / "out"), settings, config)
    write_parts(rows_to_score(20).drop(columns=["weight"]), tmp_path / "narrow", [20])
    with pytest.raises(DataError, match=r"narrow: the model reads column\(s\) \['weight'\], which the file does not"):
        score_table(MODEL_URI, str(tmp_path / "narrow"), str(tmp_path / "out"), settings, config)
    assert not (tmp_path / "out").exists()
