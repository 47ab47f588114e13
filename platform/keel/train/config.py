"""Training configuration: kept free of torch and Ray so any stage can validate it cheaply."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt


class ScalingSpec(BaseModel):
    """Ray Train scaling; ``auto`` chooses from the model size and the cluster's resources."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_workers: PositiveInt | Literal["auto"] = "auto"
    cpus_per_worker: PositiveInt | Literal["auto"] = "auto"
    use_gpu: bool | Literal["auto"] = "auto"


class TrainConfig(BaseModel):
    """Network shape, optimiser and stopping rules."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hidden_sizes: list[PositiveInt] = Field(default=[64, 32], min_length=1)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    batch_size: int = Field(default=64, ge=1)
    max_epochs: int = Field(default=100, ge=1)
    patience: int = Field(default=10, ge=1, description="epochs without val-loss improvement before stopping")
    min_delta: float = Field(default=1e-4, ge=0)
    seed: int = 42
    max_failures: int = Field(default=2, ge=0, description="worker failures to recover from checkpoints")
    mlflow_flush_interval_s: float = Field(default=5.0, ge=0)
    scaling: ScalingSpec = ScalingSpec()


def with_gpus(config: TrainConfig, gpus: int) -> TrainConfig:
    """The pipeline's ``gpus`` parameter: N > 0 trains on N workers with one GPU each; 0 keeps the config."""
    if gpus < 0:
        raise ValueError(f"gpus must be 0 or more, got {gpus}")
    if gpus == 0:
        return config
    scaling = ScalingSpec(num_workers=gpus, cpus_per_worker=config.scaling.cpus_per_worker, use_gpu=True)
    return config.model_copy(update={"scaling": scaling})
