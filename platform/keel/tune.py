"""Tune: Ray Tune search (Optuna TPE, ASHA early stopping) for the train stage's hyperparameters.

Each trial runs the train stage's own steps (the same network, optimizer,
epoch and validation functions) on in-memory copies of the splits, reporting
after every epoch so ASHA can stop the unpromising ones. Trials run as Ray
tasks, as many at once as the cluster has CPUs (or GPUs), locally or on
KubeRay. The best configuration is published for the final training run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from keel import storage, tracking
from keel.config import SearchDimension, TuneConfig
from keel.data.preprocess import LABEL, TRANSFORM_FILE, feature_matrix
from keel.data.transform import FeatureTransform
from keel.errors import TuningError
from keel.settings import KeelSettings
from keel.train.config import TrainConfig
from keel.train.scaling import check_gpu_workers

TRIALS_FILE = "trials.json"
TRIAL_TAG = "keel.tune.trial"


# ---- search space ---------------------------------------------------------------------------------------------

def _encodes(values: list[Any]) -> bool:
    """Optuna's categorical choices must be scalars: lists (hidden sizes) travel as JSON text."""
    return any(isinstance(v, (list, dict)) for v in values)


def ray_search_space(space: dict[str, SearchDimension]) -> dict[str, Any]:
    """The config's search space as Ray Tune distributions, in a fixed key order."""
    from ray import tune

    distributions: dict[str, Any] = {}
    for name in sorted(space):
        dim = space[name]
        if dim.type == "choice":
            assert dim.values is not None
            values = [json.dumps(v) for v in dim.values] if _encodes(dim.values) else dim.values
            distributions[name] = tune.choice(values)
        else:
            assert dim.low is not None and dim.high is not None  # SearchDimension validates ranges
            sample = tune.loguniform if dim.type == "loguniform" else tune.uniform
            distributions[name] = sample(dim.low, dim.high)
    return distributions


def decode_trial(sampled: dict[str, Any], space: dict[str, SearchDimension]) -> dict[str, Any]:
    """A sampled config back in TrainConfig's types (JSON-encoded choices decoded); keys outside the search
    space (what Tune adds to a trial's config) are left out."""
    decoded = {}
    for name, value in sampled.items():
        if name not in space:
            continue
        values = space[name].values
        decoded[name] = json.loads(value) if values is not None and _encodes(values) else value
    return decoded


def tuned_train_config(base: TrainConfig, tuning_manifest: dict[str, Any]) -> TrainConfig:
    """The train section with the search's best values over it (unchanged when tuning was skipped)."""
    return TrainConfig.model_validate({**base.model_dump(), **tuning_manifest.get("best_config", {})})


# ---- one trial ------------------------------------------------------------------------------------------------

def run_trial(sampled: dict[str, Any], *, data: dict[str, np.ndarray], base: dict[str, Any],
              space: dict[str, SearchDimension], max_epochs: int, threads: int) -> None:
    """Train one sampled configuration with the train stage's steps, reporting every epoch to Tune."""
    import torch
    from ray import tune

    from keel.train.loop import evaluate_epoch, train_epoch
    from keel.train.model import MLPClassifier, MLPSpec

    config = TrainConfig.model_validate({**base, **decode_trial(sampled, space)})
    torch.manual_seed(config.seed)
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # Ray exposes only this trial's GPU
    train_x, train_y, val_x, val_y = (torch.from_numpy(data[k]).to(device)
                                      for k in ("train_x", "train_y", "val_x", "val_y"))
    spec = MLPSpec(input_dim=train_x.shape[1], hidden_sizes=config.hidden_sizes,
                   num_classes=int(data["num_classes"]), dropout=config.dropout)
    model = MLPClassifier(spec).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    best, stale = float("inf"), 0  # early stopping, as in the train stage
    lowest_loss, best_accuracy = float("inf"), 0.0  # the trial's best epoch so far
    for epoch in range(1, max_epochs + 1):
        train_loss = train_epoch(model, optimizer, train_x, train_y, config.batch_size, generator)
        loss_sum, correct, count = evaluate_epoch(model, val_x, val_y)
        val_loss, val_accuracy = loss_sum / max(count, 1), correct / max(count, 1)
        best, stale = (val_loss, 0) if val_loss < best - config.min_delta else (best, stale + 1)
        lowest_loss, best_accuracy = min(lowest_loss, val_loss), max(best_accuracy, val_accuracy)
        tune.report({"val_loss": val_loss, "val_accuracy": val_accuracy, "train_loss": train_loss,
                     "best_val_loss": lowest_loss, "best_val_accuracy": best_accuracy, "epoch": epoch,
                     "reported_at": time.time()})
        if stale >= config.patience:  # the train stage's own early stopping
            return


def _arrays(splits: dict[str, str], feature_names: list[str], classes: int, settings: KeelSettings) -> dict[str, Any]:
    arrays: dict[str, Any] = {"num_classes": classes}
    for name in ("train", "val"):
        frame = storage.read_parquet(splits[name], settings)
        arrays[f"{name}_x"] = feature_matrix(frame, feature_names)
        arrays[f"{name}_y"] = frame[LABEL].to_numpy(dtype=np.int64, copy=True)
    return arrays


# ---- the search -----------------------------------------------------------------------------------------------

def trial_resources(config: TuneConfig, cpus: int, gpus: int) -> tuple[dict[str, float], int]:
    """Per-trial resources and how many trials run at once: one trial per GPU, else per CPU."""
    per_trial: dict[str, float] = {"cpu": 1, "gpu": 1} if gpus else {"cpu": 1}
    slots = gpus or max(cpus, 1)
    concurrent = slots if config.max_concurrent_trials == "auto" else config.max_concurrent_trials
    return per_trial, max(1, min(concurrent, config.num_samples))


def trial_gpus(train_config: TrainConfig, cluster_gpus: int, autoscaling: bool, max_gpus: int | None = None) -> int:
    """GPUs to spread trials over: the cluster's now or, where the run asked for GPU workers (the pipeline's
    ``gpus``) on an autoscaling cluster, as many as it asked for: trials that request them bring the
    scaled-to-zero GPU group up, as the train step's workers do. GPUs the cluster can never have fail here,
    before the trials run: the train step after them would fail on them anyway."""
    scaling = train_config.scaling
    if scaling.use_gpu is True:
        asked = scaling.num_workers if isinstance(scaling.num_workers, int) else 1
        check_gpu_workers(asked, cluster_gpus, autoscaling, max_gpus)
        return max(cluster_gpus, asked) if autoscaling else cluster_gpus
    return cluster_gpus


def ranking_metric(metric: str) -> str:
    """What ASHA and TPE judge a trial by: its best epoch so far (the one the train stage would keep), not its
    latest, which understates a trial that has begun to overfit and lets one noisy epoch get it stopped."""
    return f"best_{metric}"


def describe_values(values: dict[str, Any]) -> str:
    """Sampled values for a log or summary line, floats to three significant digits."""
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def trial_progress(config: TuneConfig) -> Any:
    """A Tune callback that prints a line as each trial ends: with Tune's own table off (``verbose=0``), a
    search over a large table (a million rows: about 30 s a trial epoch on 2 cores) showed nothing in the
    step's log for minutes."""
    from ray.tune import Callback

    class TrialProgress(Callback):  # type: ignore[misc]
        ended = 0

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self.ended += 1
            result = trial.last_result or {}
            sampled = decode_trial(trial.config, config.search_space)
            running = sum(1 for t in trials if t.status == "RUNNING" and t is not trial)  # it is, still
            values = describe_values(dict(sorted(sampled.items())))
            print(f"tune: trial {self.ended} of {config.num_samples} ended after "
                  f"{result.get('training_iteration', 0)} of {config.max_epochs} epochs, best {config.metric} "
                  f"{result.get(ranking_metric(config.metric), float('nan')):.4f} ({running} running): {values}",
                  flush=True)

    return TrialProgress()


def build_tuner(config: TuneConfig, base: TrainConfig, data: dict[str, Any], storage_path: str, run_name: str,
                cpus: int, gpus: int, search: str = "tpe_asha") -> Any:
    """A ``Tuner`` over :func:`run_trial`: TPE + ASHA (``tpe_asha``) or random search, no early stopping
    (``random``, the benchmark's baseline).

    Trials reuse the actors of ended ones (all ask for the same resources): a fresh actor imports Ray Tune and
    torch, about 4 CPU-seconds, more than a demo trial's training. The demo's 12 trials took 44 s without
    reuse and 20 s with it on 2 cores."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    per_trial, concurrent = trial_resources(config, cpus, gpus)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, data=data, base=base.model_dump(), space=config.search_space,
                             max_epochs=config.max_epochs, threads=1), per_trial)
    mode = "min" if config.metric == "val_loss" else "max"
    if search == "tpe_asha":
        sampler = optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=max(3, config.num_samples // 4))
        search_alg: Any = OptunaSearch(sampler=sampler)
        scheduler: Any = ASHAScheduler(time_attr="training_iteration", max_t=config.max_epochs,
                                       grace_period=min(config.grace_period, config.max_epochs),
                                       reduction_factor=config.reduction_factor)
    else:
        # Tune ignores max_concurrent_trials for a generator (with a warning): it takes its own cap
        search_alg = BasicVariantGenerator(random_state=config.seed, max_concurrent=concurrent)
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable, param_space=ray_search_space(config.search_space),
        tune_config=tune.TuneConfig(metric=ranking_metric(config.metric), mode=mode, search_alg=search_alg,
                                    scheduler=scheduler, num_samples=config.num_samples,
                                    max_concurrent_trials=concurrent if search == "tpe_asha" else None,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=run_name, storage_path=storage_path, verbose=0,
                                  callbacks=[trial_progress(config)]))


def trial_records(results: Any, config: TuneConfig) -> list[dict[str, Any]]:
    """Per trial: sampled config, epochs run, best score and the per-epoch history with timestamps."""
    records = []
    for index, result in enumerate(results):
        if result.error is not None:
            raise TuningError(f"tuning trial {index} failed: {result.error}") from result.error
        history = result.metrics_dataframe
        if history is None or history.empty:
            continue
        column = history[config.metric]
        best = float(column.min() if config.metric == "val_loss" else column.max())
        records.append({
            "trial": index, "config": decode_trial(result.config, config.search_space),
            "epochs": int(history["training_iteration"].max()), config.metric: best,
            "history": history[["training_iteration", "reported_at", "time_this_iter_s", "val_loss", "val_accuracy"]]
            .to_dict(orient="records"),
        })
    if not records:
        raise TuningError("no tuning trial reported a result; check the search space and the data.")
    return records


def best_record(records: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    return min(records, key=lambda r: r[metric] if metric == "val_loss" else -r[metric])


def _log_trials(settings: KeelSettings, parent_run_id: str, records: list[dict[str, Any]], metric: str) -> None:
    """Each trial as an MLflow run nested under the pipeline's run, with its per-epoch curve."""
    from mlflow.entities import Metric, Param, RunTag

    client = tracking.mlflow_client(settings)
    experiment = client.get_run(parent_run_id).info.experiment_id
    for record in records:
        run = client.create_run(experiment, run_name=f"trial-{record['trial']}",
                                tags={"mlflow.parentRunId": parent_run_id, TRIAL_TAG: str(record["trial"])})
        points = [Metric(name, float(row[name]), int(row["reported_at"] * 1000), int(row["training_iteration"]))
                  for row in record["history"] for name in ("val_loss", "val_accuracy")]
        client.log_batch(run.info.run_id, metrics=points,
                         params=[Param(k, json.dumps(v)) for k, v in sorted(record["config"].items())],
                         tags=[RunTag("keel.tune.epochs", str(record["epochs"]))])
        client.log_metric(run.info.run_id, f"best_{metric}", float(record[metric]))
        client.set_terminated(run.info.run_id, "FINISHED")


def tune(splits_uri: str, train_config: TrainConfig, config: TuneConfig, output_uri: str, settings: KeelSettings,
         run_name: str = "tune", mlflow_run_id: str = "") -> dict[str, Any]:
    """Search ``config.search_space`` and publish the best values as ``best_config``.

    With ``num_samples: 0`` nothing is searched and ``best_config`` is empty,
    so the train stage uses its section as written.
    """
    with storage.staged_output(output_uri, "tune", settings) as out:
        if config.num_samples == 0:
            out.manifest.update(best_config={}, trials=0, skipped=True)
            return out.manifest
        manifest = storage.read_manifest(splits_uri, settings)
        transform = FeatureTransform.load(storage.download(manifest["transform"], out.path(TRANSFORM_FILE), settings))
        out.path(TRANSFORM_FILE).unlink()
        data = _arrays(manifest["splits"], transform.feature_names, len(transform.classes), settings)
        started = time.perf_counter()
        records = search(config, train_config, data, run_name, settings)
        best = best_record(records, config.metric)
        out.write_json(TRIALS_FILE, records)
        if mlflow_run_id:
            _log_trials(settings, mlflow_run_id, records, config.metric)
        out.manifest.update(best_config=best["config"], best_trial=best["trial"], **{f"best_{config.metric}":
                            best[config.metric]}, trials=len(records), epochs=sum(r["epochs"] for r in records),
                            tune_s=round(time.perf_counter() - started, 3), trials_uri=out.uri_of(TRIALS_FILE))
    return out.manifest


def tune_step(splits_uri: str, train_config: TrainConfig, config: TuneConfig, gpus: int, output_uri: str,
              pipeline_run_id: str, pipeline: str, settings: KeelSettings) -> dict[str, Any]:
    """The pipeline's tune step: the search under the pipeline's MLflow run, as a Ray job where
    ``KEEL_RAY_ADDRESS`` names a cluster, else in the step.

    A skipped search publishes its manifest here and now: opening the MLflow store to find the run cost the
    step 2-3 CPU-seconds, and on a cluster a Ray job was submitted only to learn that nothing was searched.
    """
    if config.num_samples == 0:
        return tune(splits_uri, train_config, config, output_uri, settings)
    from keel import jobs
    from keel.train.config import with_gpus

    return dict(jobs.run_stage("tune", {
        "splits_uri": splits_uri, "train_config": with_gpus(train_config, gpus).model_dump(),
        "config": config.model_dump(), "output_uri": output_uri, "run_name": f"tune-{pipeline_run_id}",
        "mlflow_run_id": tracking.pipeline_run(settings, pipeline_run_id, pipeline)}, settings))


def tune_stage(settings: KeelSettings, splits_uri: str, train_config: dict[str, Any], config: dict[str, Any],
               output_uri: str, run_name: str = "tune", mlflow_run_id: str = "") -> dict[str, Any]:
    """:func:`tune` with its configs as plain data: what a Ray job receives (:mod:`keel.jobs`)."""
    return tune(splits_uri, TrainConfig.model_validate(train_config), TuneConfig.model_validate(config), output_uri,
                settings, run_name=run_name, mlflow_run_id=mlflow_run_id)


def search(config: TuneConfig, train_config: TrainConfig, data: dict[str, Any], run_name: str,
           settings: KeelSettings, method: str = "tpe_asha") -> list[dict[str, Any]]:
    """Run the search in a Ray session (local, or ``KEEL_RAY_ADDRESS``) and return the trial records.

    Trials keep no checkpoints (a trial is seconds of work on the demo, a few
    minutes on a million rows; a lost one is rerun by the stage's retry), so
    Tune's own results stay in a scratch directory on the driver and only the
    trial records are published.
    """
    import tempfile

    import ray

    from keel.train.trainer import ray_session

    with ray_session(settings), tempfile.TemporaryDirectory(prefix="keel-tune-") as scratch:
        resources = ray.cluster_resources()
        gpus = trial_gpus(train_config, int(resources.get("GPU", 0)), autoscaling=settings.ray_can_grow,
                          max_gpus=settings.ray_max_gpus)
        tuner = build_tuner(config, train_config, data, str(Path(scratch)), run_name,
                            int(resources.get("CPU", 1)), gpus, method)
        return trial_records(tuner.fit(), config)
