"""CPU and memory each pipeline step's pod asks Kubernetes for, and the most it may use.

A step without requests is a BestEffort pod: the first evicted when its node
runs short of memory, and refused outright in a namespace with a
ResourceQuota on cpu or memory (Kubernetes then requires every pod to declare
them). So every step declares both. The defaults below come from the peak
private memory (PSS of anonymous and shared memory, summed over the step's
process tree) measured in local runs of every pipeline on the demo data; the
integration tests measure it again in their local runs (resident anonymous and
shared memory, from the kernel's counters) and fail when a step outgrows its
limit.

A pipeline config's ``resources`` section overrides them per step, by the
step's name in the Kubeflow UI; they are fixed when the pipeline is compiled
(``keel submit --config``, ``keel schedule --config``), not by a run's
``config`` parameter, because KFP sets a pod's resources from the compiled
pipeline. ``limits: {nvidia.com/gpu: N}`` puts GPUs on the step's own pod,
for a cluster without a Ray cluster, where train and tune run Ray in the pod.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The forms KFP accepts (kfp.dsl.PipelineTask's own checks), so a bad value fails on load, named, not in compile.
CPU_PATTERN = r"^([0-9]*[.])?[0-9]+m?$"
MEMORY_PATTERN = r"^[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?$"
GPU_RESOURCE = "nvidia.com/gpu"
MEMORY_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
                "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def cpu_cores(quantity: str) -> float:
    """A CPU quantity ("500m", "2", "0.5") in cores."""
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def memory_bytes(quantity: str) -> int:
    """A memory quantity ("512Mi", "4Gi", "1G", "1048576") in bytes."""
    number, unit = re.fullmatch(r"([0-9]+)([A-Za-z]*)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * MEMORY_UNITS[unit]


class ResourceAmounts(BaseModel):
    """CPU, memory and NVIDIA GPUs, written as in a Kubernetes pod spec."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    cpu: str | None = Field(default=None, description='cores: "2", "0.5" or "500m"')
    memory: str | None = Field(default=None, description='bytes: "512Mi", "4Gi", "1G"')
    gpu: int | None = Field(default=None, ge=0, alias="nvidia.com/gpu",  # GPU_RESOURCE: mypy wants a literal
                            description="GPUs on the step's own pod (limits only), for training on a local Ray "
                                        "in the pod where there is no Ray cluster")

    @field_validator("cpu")
    @classmethod
    def _cpu_quantity(cls, value: str | None) -> str | None:
        if value is not None and not re.match(CPU_PATTERN, value):
            raise ValueError(f'{value!r} is not a CPU quantity: write cores, as "2", "0.5" or "500m"')
        return value

    @field_validator("memory")
    @classmethod
    def _memory_quantity(cls, value: str | None) -> str | None:
        if value is not None and not re.match(MEMORY_PATTERN, value):
            raise ValueError(f'{value!r} is not a memory quantity: write bytes, as "512Mi", "4Gi" or "1G"')
        return value


class StepResources(BaseModel):
    """One step's ``requests`` (what the scheduler reserves) and ``limits`` (past the memory limit the pod is
    OOM-killed; past the CPU limit it is throttled)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    requests: ResourceAmounts = ResourceAmounts()
    limits: ResourceAmounts = ResourceAmounts()

    @model_validator(mode="after")
    def _requests_within_limits(self) -> StepResources:
        """Kubernetes refuses a pod whose request exceeds its limit, at run time; this says so on load."""
        if self.requests.gpu is not None:
            raise ValueError(f"requests.{GPU_RESOURCE}: GPUs go under limits only (Kubernetes requests as many "
                             "as the limit, and KFP sets only the limit)")
        for name, amount in (("cpu", cpu_cores), ("memory", memory_bytes)):
            request, limit = getattr(self.requests, name), getattr(self.limits, name)
            if request is not None and limit is not None and amount(request) > amount(limit):
                raise ValueError(f"requests.{name} {request} is above limits.{name} {limit}; Kubernetes refuses "
                                 "such a pod")
        return self

    def merged(self, override: StepResources) -> StepResources:
        """This, with every amount ``override`` sets in its place."""
        return StepResources.model_validate({
            part: {**getattr(self, part).model_dump(exclude_none=True),
                   **getattr(override, part).model_dump(exclude_none=True)}
            for part in ("requests", "limits")})


def _resources(request_cpu: str, request_memory: str, limit_cpu: str, limit_memory: str) -> StepResources:
    return StepResources(requests=ResourceAmounts(cpu=request_cpu, memory=request_memory),
                         limits=ResourceAmounts(cpu=limit_cpu, memory=limit_memory))


# Measured on the demo data (peak private memory of the step's process tree, local runs of every pipeline):
# register 298 MiB, recommender-register 335, intent-register 546 (it loads the fine-tuned model).
CLIENT_STEP = _resources("250m", "512Mi", "1", "2Gi")
# ingest 126, validate 72, preprocess 129, compress 427, evaluate 362, interactions 142, utterances 261,
# recommender-evaluate 319, check-performance 396: a user's table can be far larger, so the limit leaves room.
DATA_STEP = _resources("500m", "1Gi", "2", "4Gi")
# intent-evaluate 1078: the fine-tuned sentence transformer and its variants, scored on the test split.
TRANSFORMER_SCORING_STEP = _resources("1", "2Gi", "2", "4Gi")
# A Ray stage: with the chart's Ray cluster, a light driver of a Ray job; with ray.training.enabled false, a
# whole local Ray in the pod: tune 1356, train 2016, recommender-train 1895, batch-predict 359 (the local
# engine reads the whole table: 1.7 GB at 8M rows).
RAY_STEP = _resources("1", "2Gi", "4", "8Gi")
# intent-train 2613: all-MiniLM-L6-v2 fine-tuned on a local Ray when there is no Ray cluster.
FINE_TUNING_STEP = _resources("1", "3Gi", "4", "8Gi")

DEFAULT_STEP_RESOURCES: dict[str, StepResources] = {
    "register": CLIENT_STEP, "recommender-register": CLIENT_STEP, "intent-register": CLIENT_STEP,
    "deploy": CLIENT_STEP,
    "ingest": DATA_STEP, "validate": DATA_STEP, "preprocess": DATA_STEP, "interactions": DATA_STEP,
    "utterances": DATA_STEP, "compress": DATA_STEP, "evaluate": DATA_STEP, "recommender-evaluate": DATA_STEP,
    "check-performance": DATA_STEP,
    "intent-evaluate": TRANSFORMER_SCORING_STEP,
    "tune": RAY_STEP, "train": RAY_STEP, "recommender-train": RAY_STEP, "batch-predict": RAY_STEP,
    "intent-train": FINE_TUNING_STEP,
}


def step_name(name: str) -> str:
    """A step's name as the Kubeflow UI shows it (``intent-train``); ``intent_train`` is read as the same."""
    return name.replace("_", "-")


def unknown_steps(overrides: dict[str, Any]) -> list[str]:
    return sorted(name for name in overrides if step_name(name) not in DEFAULT_STEP_RESOURCES)


def resources_for(step: str, overrides: dict[str, StepResources]) -> StepResources:
    """The step's defaults with the config's overrides for it merged in."""
    name = step_name(step)
    if name not in DEFAULT_STEP_RESOURCES:
        raise KeyError(f"no default resources for step {name!r}: add it to keel.resources.DEFAULT_STEP_RESOURCES")
    chosen = DEFAULT_STEP_RESOURCES[name]
    for key, override in overrides.items():
        if step_name(key) == name:
            chosen = chosen.merged(override)
    return chosen


def apply_resources(task: Any, resources: StepResources) -> Any:
    """Set a KFP task's requests and limits (kfp.local ignores them; Kubeflow puts them on the step's pod)."""
    setters = {("requests", "cpu"): task.set_cpu_request, ("requests", "memory"): task.set_memory_request,
               ("limits", "cpu"): task.set_cpu_limit, ("limits", "memory"): task.set_memory_limit}
    for (part, name), setter in setters.items():
        value = getattr(getattr(resources, part), name)
        if value is not None:
            setter(value)
    if resources.limits.gpu:  # 0 leaves the pod without GPUs, as if unset
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(resources.limits.gpu)
    return task
