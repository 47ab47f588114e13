"""How Ray Train hands the splits to its workers.

A split up to :data:`DRIVER_READ_MAX_BYTES` of Parquet is read by the driver and put in the object store as
one Arrow table, and each worker takes its share of the rows from there (:func:`worker_batches`). Through Ray
Data, those few megabytes would run Ray Data's executor in the worker, with its stats actor and read tasks
(Ray worker processes with seconds of start-up), in every training run and every resumed attempt: 3 s more
set-up and tear-down a run in bench_training. A larger split stays a Ray Dataset, read by Ray Data's tasks
across the cluster and streamed to the workers.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from ray.train import DataConfig

from keel import storage
from keel.settings import KeelSettings

DRIVER_READ_MAX_BYTES = 256 * 2**20
# The loop config's key for the splits held as Arrow tables in the object store
TABLES_KEY = "keel_split_tables"


@dataclass(frozen=True)
class SplitInputs:
    """The splits of one training run: Ray Datasets for the trainer's ``datasets``, and object refs of Arrow
    tables that reach the workers through the loop config."""

    datasets: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, Any] = field(default_factory=dict)
    whole: tuple[str, ...] = ()  # tables every worker reads whole, not its share of

    def with_whole_copy(self, name: str, of: str) -> SplitInputs:
        """``of`` once more as ``name``, read whole by every worker (a dataset, by :class:`OneWorkerReadsWhole`
        when told to split only the others)."""
        if of in self.tables:
            return replace(self, tables={**self.tables, name: self.tables[of]}, whole=(*self.whole, name))
        return replace(self, datasets={**self.datasets, name: self.datasets[of]})

    def loop_config(self) -> dict[str, Any]:
        return {TABLES_KEY: {"tables": dict(self.tables), "whole": list(self.whole)}}


def read_splits(splits: dict[str, str], names: tuple[str, ...], settings: KeelSettings,
                columns: list[str] | None = None) -> SplitInputs:
    """The named splits, in the object store before the workers claim the CPUs: a lazy read would wait for a
    CPU that never frees. Ray must be initialized."""
    import pyarrow.parquet as pq
    import ray
    import ray.data

    # One worker then sees rows in the same order every run: same seed, same model.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    datasets, tables = {}, {}
    for name in names:
        filesystem, path = storage.pyarrow_filesystem(splits[name], settings)
        if parquet_bytes(filesystem, path) <= DRIVER_READ_MAX_BYTES:
            tables[name] = ray.put(pq.read_table(path, filesystem=filesystem, columns=columns))
        else:
            datasets[name] = ray.data.read_parquet(path, filesystem=filesystem, columns=columns).materialize()
    return SplitInputs(datasets=datasets, tables=tables)


def parquet_bytes(filesystem: Any, path: str) -> int:
    """Size of a Parquet file, or of every file under a directory of parts."""
    from pyarrow import fs

    info = filesystem.get_file_info(path)
    if info.type != fs.FileType.Directory:
        return int(info.size or 0)
    return sum(int(entry.size or 0) for entry in filesystem.get_file_info(fs.FileSelector(path, recursive=True))
               if entry.type == fs.FileType.File)


def share_of(table: Any, rank: int, world_size: int) -> Any:
    """Worker ``rank``'s contiguous slice of ``table``: the shares differ by one row at most."""
    start, end = (len(table) * position // world_size for position in (rank, rank + 1))
    return table.slice(start, end - start)


def worker_batches(config: dict[str, Any], name: str, batch_size: int,
                   batch_format: str = "pandas") -> Iterator[Any]:
    """This worker's rows of split ``name``, ``batch_size`` at a time, as pandas frames or dicts of numpy
    arrays; from the table in the object store, or else from the trainer's dataset shard. Inside a Ray Train
    worker only."""
    import ray
    import ray.train

    shared = config.get(TABLES_KEY, {"tables": {}, "whole": []})
    if name not in shared["tables"]:
        yield from ray.train.get_dataset_shard(name).iter_batches(batch_size=batch_size, batch_format=batch_format)
        return
    table = ray.get(shared["tables"][name])
    if name not in shared["whole"]:
        context = ray.train.get_context()
        table = share_of(table, context.get_world_rank(), context.get_world_size())
    for batch in table.to_batches(max_chunksize=batch_size):
        if batch_format == "pandas":
            yield batch.to_pandas()
        else:
            yield {column: batch.column(column).to_numpy(zero_copy_only=False) for column in batch.schema.names}


class OneWorkerReadsWhole(DataConfig):
    """Ray Train's ``DataConfig``, except that a run of one worker reads each dataset whole.

    Ray Train splits a dataset with ``streaming_split``, whose coordinator is an actor per dataset: a Ray
    worker process each, seconds of start-up, to hand one worker every row. Two or more workers still get
    equal streaming splits.
    """

    def configure(self, datasets: dict[str, Any], world_size: int, worker_handles: Any, worker_node_ids: Any,
                  **kwargs: Any) -> list[dict[str, Any]]:
        if world_size != 1:
            return super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
        whole = copy.copy(self)
        whole._datasets_to_split = []  # DataConfig gives an unsplit dataset's plain iterator to every worker
        return DataConfig.configure(whole, datasets, world_size, worker_handles, worker_node_ids, **kwargs)
