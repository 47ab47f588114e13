"""How many Ray Train workers a run gets, with how many CPUs and GPUs, and whether it can ever get them.

Kept apart from the trainer, which imports torch: `keel run` checks a pipeline's GPUs before its first step, and
a skipped search checks nothing, without it.
"""

from __future__ import annotations

import logging
from typing import Any

from keel.errors import TrainingError
from keel.settings import KeelSettings
from keel.train.config import ScalingSpec

# Below this size one worker using every core beats data-parallel workers on a
# CPU machine: gradient all-reduce costs more than the compute it spreads.
DATA_PARALLEL_MIN_PARAMS = 5_000_000


def node_shape(nodes: list[dict[str, Any]]) -> tuple[int, int]:
    """From ``ray.nodes()``: the most CPUs on one live node, and the fewest CPUs per GPU on a live GPU node
    (0 where there is none). A worker's CPUs must fit on one node, not just in the cluster's total."""
    alive = [node["Resources"] for node in nodes if node.get("Alive")]
    most_cpus = max((int(r.get("CPU", 0)) for r in alive), default=0)
    per_gpu = [int(r.get("CPU", 0) // r["GPU"]) for r in alive if r.get("GPU", 0) >= 1]
    return most_cpus, min(per_gpu, default=0)


def check_gpu_workers(asked: int, gpus_now: int, can_grow: bool, max_gpus: int | None,
                      where: str = "the Ray cluster") -> None:
    """Fail now where ``asked`` GPU workers can never be placed, before any work waits for them: on a Ray that
    gets no new nodes, more than it has; on an autoscaling cluster, more than it can grow to (``max_gpus``;
    ``None``: unknown), which would otherwise wait for the autoscaler until the step's timeout (6 h)."""
    if not can_grow and asked > gpus_now:
        raise TrainingError(f"the run asks for {asked} GPU worker(s) but {where} has {gpus_now} GPU(s) and no "
                            "autoscaler to add more; lower the pipeline's gpus (0 trains on CPU) or "
                            "scaling.num_workers, or set scaling.use_gpu to auto.")
    if can_grow and max_gpus is not None and asked > max_gpus:
        raise TrainingError(f"the run asks for {asked} GPU worker(s) but the Ray cluster can grow to {max_gpus} "
                            "GPU(s) (KEEL_RAY_MAX_GPUS, from the chart's ray.training.workerGroups); lower the "
                            "pipeline's gpus (scaling.num_workers) or give the cluster a GPU worker group.")


def check_gpus_before_run(asked: int, settings: KeelSettings) -> None:
    """The pipeline's ``gpus`` checked before its first step, where they can be known without Ray: on this
    machine's own Ray (no ``KEEL_RAY_ADDRESS``), the GPUs torch sees; on an autoscaling cluster, the most it can
    grow to. A fixed cluster's GPUs are known once connected, so tune checks those."""
    if asked <= 0:
        return
    if not settings.ray_address:
        import torch

        check_gpu_workers(asked, torch.cuda.device_count(), can_grow=False, max_gpus=None,
                          where="this machine (the run's own Ray, no KEEL_RAY_ADDRESS)")
    elif settings.ray_can_grow:
        check_gpu_workers(asked, 0, can_grow=True, max_gpus=settings.ray_max_gpus)


def resolve_scaling(spec: ScalingSpec, param_count: int, cpus: int, gpus: int, autoscaling: bool = False,
                    node_cpus: int = 0, node_cpus_per_gpu: int = 0, max_gpus: int | None = None) -> dict[str, Any]:
    """Concrete worker count, CPUs and GPU use for ``ScalingConfig``.

    ``cpus`` and ``gpus`` are what the cluster has now; ``node_cpus`` and
    ``node_cpus_per_gpu`` (:func:`node_shape`; 0: unknown) cap a worker's
    automatic CPUs at what one node can give it: on the prod overlay's two
    4-CPU pods, one worker asking for all 8 CPUs would never be placed.
    With ``autoscaling`` (a cluster at ``KEEL_RAY_ADDRESS``, where KubeRay's
    autoscaler adds the nodes a request waits for, and the chart's GPU group
    starts at zero) a request beyond them is what brings those nodes up, so it
    is not an error, unless it is more than ``max_gpus``, the most the cluster
    can grow to; on a local Ray nothing would come, so it fails at once.
    """
    use_gpu = gpus > 0 if spec.use_gpu == "auto" else spec.use_gpu
    if spec.num_workers != "auto":
        workers = spec.num_workers
    elif use_gpu:
        workers = max(gpus, 1)
    else:
        workers = 1 if param_count < DATA_PARALLEL_MIN_PARAMS else max(1, cpus // 2)
    if spec.cpus_per_worker != "auto":
        cpus_per_worker = spec.cpus_per_worker
    elif use_gpu and gpus == 0:  # GPU nodes not up yet: their CPUs are unknown, so ask for Ray's default of one
        cpus_per_worker = 1
    else:
        one_node = node_cpus_per_gpu if use_gpu else node_cpus
        cpus_per_worker = max(1, min(cpus // workers, one_node) if one_node else cpus // workers)
    if use_gpu:
        check_gpu_workers(workers, gpus, autoscaling, max_gpus)
    beyond_cpus, beyond_gpus = workers * cpus_per_worker > max(cpus, 1), use_gpu and workers > gpus
    if beyond_cpus and not autoscaling:
        raise TrainingError(f"scaling asks for {workers} worker(s) x {cpus_per_worker} CPU(s) but Ray has "
                            f"{cpus} CPU(s); lower scaling.num_workers or scaling.cpus_per_worker.")
    if beyond_cpus or beyond_gpus:  # only reached with autoscaling
        logging.getLogger(__name__).warning(
            "waiting for the Ray autoscaler: %d worker(s) x %d CPU(s)%s asked for, %d CPU(s) and %d GPU(s) up now. "
            "A cluster with no worker group that has them never gets them; stop the run and lower the request "
            "(the pipeline's gpus, scaling.num_workers).", workers, cpus_per_worker,
            " + 1 GPU each" if use_gpu else "", cpus, gpus)
    return {"num_workers": workers, "cpus_per_worker": cpus_per_worker, "use_gpu": use_gpu}


def cluster_scaling(spec: ScalingSpec, param_count: int, settings: KeelSettings) -> dict[str, Any]:
    """:func:`resolve_scaling` for the Ray cluster this process is connected to: its resources now, its nodes'
    shape, whether an autoscaler can add more, and up to how many GPUs (:class:`KeelSettings`)."""
    import ray

    resources = ray.cluster_resources()
    node_cpus, node_cpus_per_gpu = node_shape(ray.nodes())
    return resolve_scaling(spec, param_count, int(resources.get("CPU", 1)), int(resources.get("GPU", 0)),
                           autoscaling=settings.ray_can_grow, node_cpus=node_cpus,
                           node_cpus_per_gpu=node_cpus_per_gpu, max_gpus=settings.ray_max_gpus)
