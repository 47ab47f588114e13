"""What each Ray Train worker runs: steps, epochs, early stopping, checkpoints.

Layered as ``train_epoch``/``evaluate_epoch`` -> ``train_loop_per_worker`` so
the steps can be tested without Ray. The worker state needed to resume after a
failure (weights, optimizer, epoch, early-stopping counters, best weights) is
in every checkpoint; the best weights only when they are not the checkpoint's
own weights, so a model that is still improving is not written twice.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from keel.data.preprocess import LABEL, feature_matrix
from keel.train.model import MLPClassifier, MLPSpec

STATE_FILE = "state.pt"


@dataclass
class TrainState:
    """Everything a resumed worker needs to continue as if nothing happened."""

    epoch: int = 0
    best_val_loss: float = float("inf")
    epochs_without_improvement: int = 0
    best_weights: dict[str, torch.Tensor] | None = None
    best_epoch: int = 0  # the epoch whose weights best_weights holds
    history: list[dict[str, float]] = field(default_factory=list)
    samples_seen: int = 0
    train_seconds: float = 0.0  # forward/backward only
    loop_seconds: float = 0.0  # whole epochs: training, validation, logging, checkpoint and report
    resumed_from: list[int] = field(default_factory=list)  # the checkpointed epoch of each restart


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, features: torch.Tensor,
                labels: torch.Tensor, batch_size: int, generator: torch.Generator,
                loss_fn: LossFn | None = None, after_step: Callable[[], None] | None = None) -> float:
    """One pass over shuffled in-memory data; returns the mean training loss.

    ``loss_fn(logits, batch_indices)`` replaces cross-entropy (distillation
    needs the teacher's logits of the same rows); ``after_step`` runs after
    every optimizer step (pruning re-applies its masks there).
    """
    model.train()
    cross_entropy = nn.CrossEntropyLoss()
    order = torch.randperm(len(labels), generator=generator)
    total = 0.0
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        optimizer.zero_grad(set_to_none=True)
        logits = model(features[batch])
        loss = cross_entropy(logits, labels[batch]) if loss_fn is None else loss_fn(logits, batch)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        total += loss.item() * len(batch)
    return total / max(len(labels), 1)


@torch.no_grad()
def evaluate_epoch(model: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, int]:
    """Summed loss, correct predictions and count, so workers can all-reduce them."""
    model.eval()
    logits = model(features)
    loss = nn.functional.cross_entropy(logits, labels, reduction="sum").item()
    correct = int((logits.argmax(dim=1) == labels).sum())
    return loss, correct, len(labels)


def global_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum across workers so every worker takes the same early-stopping decision."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def load_shard(config: dict[str, Any], name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Read this worker's rows of a split into memory once, for the whole run."""
    from keel.train.ingest import worker_batches

    feature_names = config["feature_names"]
    features, labels = [], []
    for batch in worker_batches(config, name, batch_size=65536):
        features.append(feature_matrix(batch, feature_names))
        labels.append(batch[LABEL].to_numpy(dtype=np.int64))
    if not labels:
        return torch.empty((0, len(feature_names)), device=device), torch.empty(0, dtype=torch.int64, device=device)
    return (torch.from_numpy(np.concatenate(features)).to(device),
            torch.from_numpy(np.concatenate(labels)).to(device))


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, fresh: Callable[[], Any] = TrainState) -> Any:
    """The worker state of the latest checkpoint, weights and optimizer loaded; ``fresh()`` on a first start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return fresh()
    with checkpoint.as_directory() as directory:
        weights, optimizer_state, state = read_checkpoint(Path(directory))
    unwrap(model).load_state_dict(weights)
    optimizer.load_state_dict(optimizer_state)
    state.resumed_from = [*getattr(state, "resumed_from", []), state.epoch]
    return state


def keep_best(state: Any, model: nn.Module) -> None:
    """Remember the weights of the epoch just finished (``state.epoch``) as the best so far."""
    state.best_weights = copy.deepcopy(unwrap(model).state_dict())
    state.best_epoch = state.epoch


def write_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: Any) -> None:
    """Weights, optimizer and worker state in one file; the best weights are left out when they are the
    weights being saved (the latest epoch was the best), which halves a checkpoint while a model improves."""
    if state.best_weights is not None and getattr(state, "best_epoch", None) == state.epoch:
        state = dataclasses.replace(state, best_weights=None)
    torch.save({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "state": state},
               directory / STATE_FILE)


def read_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Any]:
    """Weights, optimizer state and worker state of :func:`write_checkpoint`, best weights filled back in."""
    saved = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
    state = saved["state"]
    if state.best_weights is None and state.epoch > 0 and getattr(state, "best_epoch", None) == state.epoch:
        # The loaded tensors themselves: loading them into a model copies them, so nothing aliases them.
        state.best_weights = saved["model"]
    return saved["model"], saved["optimizer"], state


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel wrapper (or the network itself)."""
    inner = getattr(model, "module", model)
    assert isinstance(inner, nn.Module)
    return inner


def report(metrics: dict[str, float], model: nn.Module, optimizer: torch.optim.Optimizer, state: Any) -> None:
    """Report the epoch; rank 0 attaches a checkpoint so a failure costs at most one epoch."""
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        write_checkpoint(Path(directory), model, optimizer, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _metric_logger(config: dict[str, Any]) -> Any:
    """Rank 0 logs to the pipeline's MLflow run; other ranks and untracked runs log nowhere."""
    import ray.train

    if not config.get("mlflow_run_id") or ray.train.get_context().get_world_rank() != 0:
        return None
    from mlflow import MlflowClient

    from keel.tracking import MetricBuffer

    return MetricBuffer(MlflowClient(config["mlflow_tracking_uri"]), config["mlflow_run_id"],
                        interval_s=config["mlflow_flush_interval_s"])


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train with early stopping on validation loss, checkpointing every epoch."""
    import ray.train
    import ray.train.torch

    torch.manual_seed(config["seed"])
    torch.set_num_threads(config["threads_per_worker"])
    device = ray.train.torch.get_device()
    train_x, train_y = load_shard(config, "train", device)
    val_x, val_y = load_shard(config, "val", device)
    model = ray.train.torch.prepare_model(MLPClassifier(MLPSpec.model_validate(config["spec"])))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["learning_rate"], weight_decay=config["weight_decay"])
    state: TrainState = restore(model, optimizer)
    fit_epochs(model, optimizer, state, (train_x, train_y, val_x, val_y), config, device, _metric_logger(config))


Evaluator = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[float, float, int]]


def fit_epochs(model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
               data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], config: dict[str, Any],
               device: torch.device, logger: Any = None, evaluate: Evaluator = evaluate_epoch) -> None:
    """Epochs until ``max_epochs`` or ``patience``: train, validate (summed over workers), keep the best
    weights, report with a checkpoint. Any model that takes one input tensor fits here."""
    train_x, train_y, val_x, val_y = data
    if state.resumed_from and finished(state, config):
        # Restarted after the last epoch was checkpointed (the driver died while publishing): report the
        # restored state once, so the result says it resumed instead of looking like a fresh run.
        report(dict(state.history[-1]), model, optimizer, state)
        return
    generator = torch.Generator().manual_seed(config["seed"] + state.epoch)
    while not finished(state, config):
        started = time.perf_counter()
        train_loss = train_epoch(model, optimizer, train_x, train_y, config["batch_size"], generator)
        state.train_seconds += time.perf_counter() - started
        state.samples_seen += len(train_y)
        val_loss_sum, correct, count = global_sum(list(evaluate(model, val_x, val_y)), device)
        val_loss = val_loss_sum / max(count, 1)
        state.epoch += 1
        if val_loss < state.best_val_loss - config["min_delta"]:
            state.best_val_loss, state.epochs_without_improvement = val_loss, 0
            keep_best(state, model)
        else:
            state.epochs_without_improvement += 1
        metrics: dict[str, float] = {"train_loss": train_loss, "val_loss": val_loss,
                                     "val_accuracy": correct / max(count, 1), "epoch": state.epoch}
        state.history.append(dict(metrics))
        if logger is not None:
            logger.log({k: v for k, v in metrics.items() if k != "epoch"}, step=state.epoch)
            if finished(state, config):
                logger.flush()
            metrics["mlflow_log_seconds"] = logger.seconds_spent
        state.loop_seconds += time.perf_counter() - started
        metrics.update(train_seconds=state.train_seconds, loop_seconds=state.loop_seconds,
                       samples_seen=state.samples_seen)
        reporting = time.perf_counter()
        report(metrics, model, optimizer, state)
        state.loop_seconds += time.perf_counter() - reporting  # counted from the next report on


def finished(state: TrainState, config: dict[str, Any]) -> bool:
    return state.epoch >= config["max_epochs"] or state.epochs_without_improvement >= config["patience"]
