"""How the splits reach Ray Train's workers: read by the driver into the object store when small, each
worker taking its share; by Ray Data when not, one worker's whole dataset through a plain iterator (no split
coordinator actor)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from keel.settings import KeelSettings
from keel.train import ingest
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
    import ray

    splits = _parts(tmp_path)
    monkeypatch.setattr(ingest, "DRIVER_READ_MAX_BYTES", 10**9 if read_by == "driver" else 0)
    inputs = ingest.read_splits(splits, ("train", "val"), settings, columns=["x"])
    if read_by == "driver":
        assert inputs.datasets == {} and set(inputs.tables) == {"train", "val"}
        train, val = (ray.get(inputs.tables[name]) for name in ("train", "val"))
        assert train["x"].to_pylist() == list(range(100))
        assert val.column_names == ["x"] and len(val) == 40
    else:
        assert inputs.tables == {} and set(inputs.datasets) == {"train", "val"}
        assert [row["x"] for row in inputs.datasets["train"].iter_rows()] == list(range(100))
        assert inputs.datasets["val"].columns() == ["x"] and inputs.datasets["val"].count() == 40
    assert ingest.parquet_bytes(*ingest.storage.pyarrow_filesystem(splits["train"], settings)) == sum(
        part.stat().st_size for part in (tmp_path / "train").iterdir())


@pytest.mark.parametrize("rows", [0, 1, 5, 40])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_the_workers_shares_hold_every_row_once_in_order(rows: int, world_size: int) -> None:
    import pyarrow as pa

    table = pa.table({"x": list(range(rows))})
    shares = [ingest.share_of(table, rank, world_size) for rank in range(world_size)]
    assert [x for share in shares for x in share["x"].to_pylist()] == list(range(rows))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def _rows_each_worker_read(config: dict[str, Any]) -> None:
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    read = {name: [int(x) for batch in ingest.worker_batches(config, name, batch_size=7, batch_format=form)
                   for x in batch["x"]]
            for name, form in (("train", "pandas"), ("seen", "numpy"), ("val", "pandas"))}
    (Path(config["out"]) / f"rank-{rank}.json").write_text(json.dumps(read))


def test_two_workers_split_a_table_and_each_read_its_whole_copy(local_ray: None, tmp_path: Path,
                                                                settings: KeelSettings) -> None:
    """What the recommender gets: its training rows split between the workers, and the same rows whole on
    every worker (``seen``, for masking); a split read by Ray Data reaches the workers beside them."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    splits = _parts(tmp_path)
    inputs = ingest.read_splits(splits, ("train",), settings).with_whole_copy("seen", of="train")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ingest, "DRIVER_READ_MAX_BYTES", 0)
        val = ingest.read_splits(splits, ("val",), settings)
    inputs = ingest.SplitInputs(datasets=val.datasets, tables=inputs.tables, whole=inputs.whole)
    out = tmp_path / "read"
    out.mkdir()
    TorchTrainer(_rows_each_worker_read, train_loop_config={"out": str(out), **inputs.loop_config()},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(storage_path=str(tmp_path / "ray")), datasets=inputs.datasets,
                 dataset_config=ingest.OneWorkerReadsWhole(datasets_to_split=["val"])).fit()
    first, second = (json.loads((out / f"rank-{rank}.json").read_text()) for rank in (0, 1))
    assert first["train"] == list(range(50)) and second["train"] == list(range(50, 100))
    assert first["seen"] == second["seen"] == list(range(100))
    assert sorted(first["val"] + second["val"]) == list(range(40))


def test_one_worker_iterates_the_whole_dataset_and_two_get_streaming_splits(local_ray: None) -> None:
    import ray.data

    datasets = {"train": ray.data.range(50).materialize(), "val": ray.data.range(10).materialize()}
    (alone,) = OneWorkerReadsWhole().configure(datasets, 1, None, None)
    assert sorted(row["id"] for row in alone["train"].iter_rows()) == list(range(50))
    assert "StreamSplit" not in type(alone["train"]).__name__ and alone["val"].schema() is not None
    pair = OneWorkerReadsWhole(datasets_to_split=["train"]).configure(datasets, 2, None, None)
    assert {type(shards["train"]).__name__ for shards in pair} == {"StreamSplitDataIterator"}
    assert "StreamSplit" not in type(pair[1]["val"]).__name__  # an unsplit dataset stays whole on each


def test_a_workers_features_are_row_major_as_each_step_gathers_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """pandas hands an Arrow batch's float columns over column-major; rows gathered from that tensor each
    step trained the demo's table at 0.8x a plain PyTorch loop's speed (bench_training)."""
    import pyarrow as pa
    import torch

    from keel.train.loop import load_shard

    table = pa.table({"a": [1.0, 2.0, 3.0], "b": [4.0, 5.0, 6.0], "label": [0, 1, 0]})
    monkeypatch.setattr(ingest, "worker_batches", lambda config, name, batch_size: (
        batch.to_pandas() for batch in table.to_batches()))
    features, labels = load_shard({"feature_names": ["a", "b"]}, "train", torch.device("cpu"))
    assert features.is_contiguous() and features.tolist() == [[1.0, 4.0], [2.0, 5.0], [3.0, 6.0]]
    assert labels.tolist() == [0, 1, 0]
