"""How Ray Train hands the splits to its workers."""

from __future__ import annotations

import copy
from typing import Any

from ray.train import DataConfig


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
