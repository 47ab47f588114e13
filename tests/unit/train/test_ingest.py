"""How the splits reach Ray Train's workers: read by the driver when small, by Ray Data when not, and one
worker's whole dataset through a plain iterator (no split coordinator actor)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from keel.settings import KeelSettings
from keel.train import trainer
from keel.train.ingest import OneWorkerReadsWhole


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _parts(directory: Path) -> dict[str, str]:
    """A split as one file and a split as a directory of two Parquet parts."""
    rows = pd.DataFrame({"x": range(100), "label": [i % 3 for i in range(100)]})
    rows.iloc[:40].to_parquet(directory / "val.parquet", index=False)
    (directory / "train").mkdir()
    rows.iloc[:60].to_parquet(directory / "train" / "part-0.parquet", index=False)
    rows.iloc[60:].to_parquet(directory / "train" / "part-1.parquet", index=False)
    return {"train": str(directory / "train"), "val": str(directory / "val.parquet")}


@pytest.mark.parametrize("read_by", ["driver", "ray_data"])
def test_either_read_gives_every_row_in_order(read_by: str, local_ray: None, tmp_path: Path, settings: KeelSettings,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    splits = _parts(tmp_path)
    monkeypatch.setattr(trainer, "DRIVER_READ_MAX_BYTES", 10**9 if read_by == "driver" else 0)
    datasets = trainer.materialized_splits(splits, ("train", "val"), settings, columns=["x"])
    assert [row["x"] for row in datasets["train"].iter_rows()] == list(range(100))
    assert datasets["val"].columns() == ["x"] and datasets["val"].count() == 40
    assert trainer.parquet_bytes(*trainer.storage.pyarrow_filesystem(splits["train"], settings)) == sum(
        part.stat().st_size for part in (tmp_path / "train").iterdir())


def test_one_worker_iterates_the_whole_dataset_and_two_get_streaming_splits(local_ray: None) -> None:
    import ray.data

    datasets = {"train": ray.data.range(50).materialize(), "val": ray.data.range(10).materialize()}
    (alone,) = OneWorkerReadsWhole().configure(datasets, 1, None, None)
    assert sorted(row["id"] for row in alone["train"].iter_rows()) == list(range(50))
    assert "StreamSplit" not in type(alone["train"]).__name__ and alone["val"].schema() is not None
    pair = OneWorkerReadsWhole(datasets_to_split=["train"]).configure(datasets, 2, None, None)
    assert {type(shards["train"]).__name__ for shards in pair} == {"StreamSplitDataIterator"}
    assert "StreamSplit" not in type(pair[1]["val"]).__name__  # an unsplit dataset stays whole on each
