"""The train stage: a Ray Train ``TorchTrainer`` over the preprocessed Parquet splits.

Locally it starts (and stops) a Ray instance; with ``KEEL_RAY_ADDRESS`` the
same code runs on a cluster. The published model directory holds the best
weights by validation loss, the network spec and the feature transform.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any


from keel import storage
from keel.data.preprocess import LABEL, TRANSFORM_FILE
from keel.data.transform import FeatureTransform
from keel.errors import TrainingError
from keel.settings import STEP_RAY_SYSTEM_CONFIG, KeelSettings
from keel.train.config import TrainConfig
from keel.train.loop import TrainState, read_checkpoint, train_loop_per_worker
from keel.train.model import MLPClassifier, MLPSpec, parameter_count, save_model
from keel.train.scaling import cluster_scaling

if TYPE_CHECKING:  # ray.train at import would tax every importer of ray_session
    from keel.train.ingest import SplitInputs

# Ray Train V2 hands a worker's report to the controller through a one-slot
# queue that the controller drains at this interval. Its default (2 s) would
# make every per-epoch checkpoint of a small model cost 2 s of waiting.
REPORT_POLL_INTERVAL_S = "0.05"

HISTORY_FILE = "history.json"


@contextmanager
def _environment_of_its_processes() -> Iterator[None]:
    """Start the private Ray with the environment its processes should inherit; the driver's own environment
    is restored once it has started.

    - A GCS port chosen here, with RAY_ADDRESS naming it. Inside a cluster, Ray's state API finds "the" cluster
      through RAY_ADDRESS, or else the last ``ray start`` on the machine. Ray Train's placement-group cleaner
      asks it, from inside the cluster, whether the training controller is alive. With ``keel serve
      --detach``'s head up, the answer came from that other cluster, which has no such actor: the cleaner
      removed the run's placement group as its workers started, and training failed after its retries.
    - No preemption watcher in Ray Train's controller (unless the driver's environment asks for one): it waits
      for a node to be drained, which a one-machine Ray never is, and it is one more Ray process (2 CPU-seconds)
      in every training run.
    """
    import os
    import socket

    from ray._private.services import get_node_ip_address

    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    pinned = {"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": f"{get_node_ip_address()}:{port}",
              "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    before = {name: os.environ.get(name) for name in pinned}
    os.environ.update(pinned)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def ray_session(settings: KeelSettings) -> Iterator[float]:
    """Connect to ``KEEL_RAY_ADDRESS`` or start a local Ray; yields the start-up seconds."""
    import os

    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", REPORT_POLL_INTERVAL_S)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    started = time.perf_counter()
    owned = not ray.is_initialized()
    if owned:
        if settings.ray_address:
            ray.init(address=settings.ray_address, log_to_driver=False)
        else:
            # address="local": a private instance, even when `keel serve --detach` left a head running
            with _environment_of_its_processes():
                ray.init(address="local", include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING, _system_config=STEP_RAY_SYSTEM_CONFIG)
    try:
        yield time.perf_counter() - started
    finally:
        if owned:
            ray.shutdown()


def run_config(run_name: str, checkpoint_uri: str, max_failures: int, settings: KeelSettings) -> Any:
    """Ray Train's ``RunConfig`` for every Keel trainer: checkpoints under the run, bounded recovery."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    # Checkpointing: the latest two, enough to resume after a failure mid-save
    checkpoint_config = CheckpointConfig(num_to_keep=2)
    # Workers killed while the group starts count too: Ray's default retries those forever,
    # so a cluster that can never start the workers would hang the step instead of failing it.
    failure_config = FailureConfig(max_failures=max_failures,  # type: ignore[call-arg]  # V2's; mypy sees V1
                                   controller_failure_limit=max_failures)
    # Storage: under the run's artifact root, local or S3
    filesystem, path = storage.pyarrow_filesystem(checkpoint_uri, settings)
    return RunConfig(name=run_name, storage_path=path, storage_filesystem=filesystem,
                     checkpoint_config=checkpoint_config, failure_config=failure_config)


def build_trainer(loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], inputs: SplitInputs,
                  scaling: dict[str, Any], max_failures: int, checkpoint_uri: str, run_name: str,
                  settings: KeelSettings, **trainer_options: Any) -> Any:
    """A ``TorchTrainer`` running ``loop`` on each worker, with its Ray config objects in one place; the
    loop reads the splits with :func:`keel.train.ingest.worker_batches`."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from keel.train.ingest import OneWorkerReadsWhole

    trainer_options.setdefault("dataset_config", OneWorkerReadsWhole())
    scaling_config = ScalingConfig(num_workers=scaling["num_workers"], use_gpu=scaling["use_gpu"],
                                   resources_per_worker={"CPU": scaling["cpus_per_worker"]})
    return TorchTrainer(loop, train_loop_config={**loop_config, **inputs.loop_config()},
                        scaling_config=scaling_config,
                        run_config=run_config(run_name, checkpoint_uri, max_failures, settings),
                        datasets=inputs.datasets or None, **trainer_options)


def fit_or_fail(trainer: Any, max_failures: int) -> Any:
    """``trainer.fit()``, with Ray's failure after the last recovery attempt as a :class:`TrainingError`."""
    import ray.train

    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise TrainingError(f"training failed after {max_failures} recovery attempt(s) "
                            f"(train.max_failures): {e}") from e


def final_state(result: Any, no_best: str) -> Any:
    """The worker state in the last checkpoint; ``no_best`` is the error when no epoch improved."""
    if result.error is not None:
        raise TrainingError(f"training failed after {result.metrics or 'no'} reported metrics: "
                            f"{result.error}") from result.error
    if result.checkpoint is None:
        raise TrainingError("training reported no checkpoint; no model was produced.")
    with result.checkpoint.as_directory() as directory:
        _, _, state = read_checkpoint(Path(directory))
    if state.best_weights is None:
        raise TrainingError(no_best)
    return state


def train(splits_uri: str, config: TrainConfig, output_uri: str, checkpoint_uri: str, settings: KeelSettings,
          run_name: str = "train", mlflow_run_id: str = "") -> dict[str, Any]:
    """Train the MLP on the splits at ``splits_uri`` and publish the best model at ``output_uri``.

    Args:
        splits_uri: a published preprocess output (train/val Parquet plus transform.json).
        config: network, optimiser, early stopping and scaling.
        output_uri: where the model directory is published.
        checkpoint_uri: Ray Train storage for per-epoch checkpoints.
        settings: Ray address, S3 endpoint and MLflow URI.
        run_name: the Ray Train run name; the same name resumes from its checkpoints.
        mlflow_run_id: when set, rank 0 logs epoch metrics to this MLflow run.
    """
    with storage.staged_output(output_uri, "train", settings) as out, \
            tempfile.TemporaryDirectory(prefix="keel-train-") as scratch:
        manifest = storage.read_manifest(splits_uri, settings)
        transform_path = storage.download(manifest["transform"], Path(scratch) / TRANSFORM_FILE, settings)
        transform = FeatureTransform.load(transform_path)
        spec = MLPSpec(input_dim=len(transform.feature_names), hidden_sizes=config.hidden_sizes,
                       num_classes=len(transform.classes), dropout=config.dropout)
        with ray_session(settings) as ray_startup_s:
            fit_started = time.perf_counter()
            result, scaling = _fit(config, spec, transform, manifest["splits"], checkpoint_uri, run_name,
                                   mlflow_run_id, settings)
            fit_s = time.perf_counter() - fit_started
        state: TrainState = final_state(
            result, "no epoch produced a finite validation loss; check the data and learning rate.")
        assert state.best_weights is not None  # final_state raises otherwise
        model = MLPClassifier(spec)
        model.load_state_dict(state.best_weights)
        save_model(model, spec, out.dir)
        shutil.copyfile(transform_path, out.path(TRANSFORM_FILE))
        out.write_json(HISTORY_FILE, state.history)
        out.manifest.update(
            epochs=state.epoch, best_val_loss=state.best_val_loss,
            stopped_early=state.epoch < config.max_epochs, parameters=parameter_count(model),
            scaling=scaling, ray_startup_s=round(ray_startup_s, 3), fit_s=round(fit_s, 3),
            train_s=round(state.train_seconds, 4), loop_s=round(state.loop_seconds, 4),
            samples_seen=state.samples_seen,
            samples_per_s=round(state.samples_seen / max(state.loop_seconds, 1e-9), 1),
            mlflow_log_s=round(float(result.metrics.get("mlflow_log_seconds", 0.0)), 4),
            label_column=LABEL, checkpoints=checkpoint_uri, resumed_from_epochs=state.resumed_from,
        )
    return out.manifest


def train_stage(settings: KeelSettings, splits_uri: str, config: dict[str, Any], output_uri: str,
                checkpoint_uri: str, run_name: str = "train", mlflow_run_id: str = "") -> dict[str, Any]:
    """:func:`train` with its config as plain data: what a Ray job receives (:mod:`keel.jobs`)."""
    return train(splits_uri, TrainConfig.model_validate(config), output_uri, checkpoint_uri, settings,
                 run_name=run_name, mlflow_run_id=mlflow_run_id)


def _fit(config: TrainConfig, spec: MLPSpec, transform: FeatureTransform, splits: dict[str, str],
         checkpoint_uri: str, run_name: str, mlflow_run_id: str, settings: KeelSettings) -> tuple[Any, dict[str, Any]]:
    """Size the workers to the cluster, build the trainer and run it; Ray must be initialized."""
    from keel.train.ingest import read_splits

    scaling = cluster_scaling(config.scaling, parameter_count(MLPClassifier(spec)), settings)
    loop_config = {
        **config.model_dump(exclude={"scaling", "max_failures"}), "spec": spec.model_dump(),
        "feature_names": transform.feature_names, "threads_per_worker": scaling["cpus_per_worker"],
        "mlflow_run_id": mlflow_run_id, "mlflow_tracking_uri": settings.mlflow_tracking_uri,
    }
    inputs = read_splits(splits, ("train", "val"), settings)
    trainer = build_trainer(train_loop_per_worker, loop_config, inputs, scaling, config.max_failures,
                            checkpoint_uri, run_name, settings)
    return fit_or_fail(trainer, config.max_failures), scaling
