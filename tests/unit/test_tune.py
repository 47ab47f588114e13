"""Tuning: config validation, the search space encoding, and a real (small) Ray Tune search."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

import mlflow
import pytest

from keel import storage, tracking
from keel.config import SearchDimension, TuneConfig
from keel.errors import ConfigError, TrainingError
from keel.settings import load_settings
from keel.train.config import TrainConfig
from keel.tune import (decode_trial, ranking_metric, ray_search_space, run_trial, trial_gpus, trial_resources, tune,
                       tune_step, tuned_train_config)
from tests.processes import ActorProcesses
from tests.stages import run_stages, small_config, write_small_source

SPACE = {"learning_rate": {"type": "loguniform", "low": 1e-3, "high": 1e-1},
         "hidden_sizes": {"type": "choice", "values": [[8], [16, 8]]}}


@pytest.mark.parametrize("tune_section, message", [
    ({"num_samples": 2, "search_space": {"epochs": {"type": "choice", "values": [1]}}}, "not tunable"),
    ({"num_samples": 2}, "needs a search_space"),
    ({"search_space": {"dropout": {"type": "uniform", "low": 0.5, "high": 0.1}}}, "tune.search_space.dropout"),
    ({"search_space": {"learning_rate": {"type": "loguniform", "low": 0, "high": 1}}}, "low` > 0"),
    # values the train section would reject fail here, not in the first trial that samples them
    ({"search_space": {"dropout": {"type": "uniform", "low": 0.5, "high": 1.0}}},
     r"search_space.dropout: high 1.0 is not a valid train.dropout \(Input should be less than 1\)"),
    ({"search_space": {"batch_size": {"type": "choice", "values": [32, 0]}}},
     r"search_space.batch_size: value 0 is not a valid train.batch_size"),
    ({"search_space": {"hidden_sizes": {"type": "choice", "values": [[8], 8]}}},
     r"search_space.hidden_sizes: value 8 is not a valid train.hidden_sizes"),
    ({"search_space": {"hidden_sizes": {"type": "choice", "values": [[8, 0]]}}},
     r"search_space.hidden_sizes: value \[8, 0\] is not a valid train.hidden_sizes \(Input should be greater than 0"),
    ({"search_space": {"batch_size": {"type": "uniform", "low": 16, "high": 64}}},
     r"train.batch_size is a whole number, and a range samples fractions; use a choice"),
    ({"max_concurrent_trials": 0}, r"tune.max_concurrent_trials: 0 should be greater than 0 or 'auto'$"),
])
def test_bad_tune_sections_name_the_field(tune_section: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        small_config(tune=tune_section)


def test_list_choices_travel_as_json_and_come_back_as_lists() -> None:
    space = TuneConfig.model_validate({"search_space": SPACE}).search_space
    assert ray_search_space(space)["hidden_sizes"].categories == ["[8]", "[16, 8]"]
    assert decode_trial({"hidden_sizes": "[16, 8]", "learning_rate": 0.01}, space) == {
        "hidden_sizes": [16, 8], "learning_rate": 0.01}


def test_tuned_values_override_the_train_section() -> None:
    tuned = tuned_train_config(TrainConfig(max_epochs=7), {"best_config": {"hidden_sizes": [4], "dropout": 0.2}})
    assert (tuned.hidden_sizes, tuned.dropout, tuned.max_epochs) == ([4], 0.2, 7)
    assert tuned_train_config(TrainConfig(), {"best_config": {}}) == TrainConfig()


@pytest.mark.parametrize("cpus, gpus, samples, expected", [(2, 0, 12, ({"cpu": 1}, 2)), (16, 0, 4, ({"cpu": 1}, 4)),
                                                           (8, 2, 12, ({"cpu": 1, "gpu": 1}, 2))])
def test_trials_run_one_per_cpu_or_gpu(cpus: int, gpus: int, samples: int, expected: tuple) -> None:
    config = TuneConfig.model_validate({"num_samples": samples, "search_space": SPACE})
    assert trial_resources(config, cpus, gpus) == expected


def test_trials_wait_for_the_gpus_a_run_asked_for_only_where_an_autoscaler_brings_them_in_reach() -> None:
    from keel.train.config import with_gpus

    asked = with_gpus(TrainConfig(), 2)  # the pipeline's gpus=2
    assert trial_gpus(asked, cluster_gpus=0, autoscaling=True) == 2
    assert trial_gpus(asked, cluster_gpus=4, autoscaling=True) == 4
    with pytest.raises(TrainingError, match="has 0 GPU"):  # a local Ray gets no GPU node: fail before the trials
        trial_gpus(asked, cluster_gpus=0, autoscaling=False)
    assert trial_gpus(asked, cluster_gpus=3, autoscaling=False) == 3
    assert trial_gpus(TrainConfig(), cluster_gpus=0, autoscaling=True) == 0  # use_gpu auto: what is there
    assert trial_gpus(asked, cluster_gpus=0, autoscaling=True, max_gpus=2) == 2
    with pytest.raises(TrainingError, match="can grow to 1 GPU"):  # before any trial waits for a second GPU
        trial_gpus(asked, cluster_gpus=0, autoscaling=True, max_gpus=1)


def test_trials_report_their_best_epoch_so_far_which_ranks_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """An overfitting trial (noisy labels, a large learning rate): its latest epoch is worse than its best,
    and the best so far is what it reports for ASHA and TPE to rank it by."""
    reports: list[dict] = []
    monkeypatch.setattr("ray.tune.report", reports.append)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 6)).astype(np.float32)
    y = ((x[:, 0] + rng.normal(scale=1.5, size=240)) > 0).astype(np.int64)
    data = {"num_classes": 2, "train_x": x[:160], "train_y": y[:160], "val_x": x[160:], "val_y": y[160:]}
    base = TrainConfig(hidden_sizes=[64, 64], learning_rate=0.03, batch_size=16, patience=100).model_dump()
    run_trial({}, data=data, base=base, space={}, max_epochs=12, threads=1)
    assert len(reports) == 12
    assert [r["best_val_loss"] for r in reports] == list(itertools.accumulate((r["val_loss"] for r in reports), min))
    assert [r["best_val_accuracy"] for r in reports] == list(
        itertools.accumulate((r["val_accuracy"] for r in reports), max))
    assert reports[-1]["best_val_loss"] < reports[-1]["val_loss"]  # overfit: the latest epoch is not the best
    assert all(ranking_metric(metric) in reports[0] for metric in ("val_loss", "val_accuracy"))


def test_trials_get_row_major_features_as_each_step_gathers_rows(settings, tmp_path: Path) -> None:
    """pandas gives a Parquet table's float columns over column-major; each trial's steps gather rows."""
    import pandas as pd

    from keel.tune import _arrays

    path = tmp_path / "train.parquet"
    pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0], "label": [0, 1]}).to_parquet(path, index=False)
    arrays = _arrays({"train": str(path), "val": str(path)}, ["a", "b"], 2, settings)
    assert arrays["train_x"].flags["C_CONTIGUOUS"] and arrays["train_x"].tolist() == [[1.0, 3.0], [2.0, 4.0]]
    assert arrays["val_y"].tolist() == [0, 1]


def test_zero_samples_skips_the_search(settings, tmp_path: Path) -> None:
    manifest = tune("unused", TrainConfig(), TuneConfig(), storage.stage_uri(settings, "r", "tune"), settings)
    assert manifest["best_config"] == {} and manifest["skipped"]


def test_a_skipped_search_asks_neither_the_ray_cluster_nor_mlflow(keel_home: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_RAY_ADDRESS", "http://127.0.0.1:9")  # nothing listens there: a Ray job would fail
    settings = load_settings()
    output = storage.stage_uri(settings, "r", "tune")
    manifest = tune_step("unused", TrainConfig(), TuneConfig(), 0, output, "r", "small", settings)
    assert manifest["skipped"] and storage.read_manifest(output, settings)["best_config"] == {}
    assert not (settings.home / "mlflow.db").exists()  # no pipeline run was looked up (or created)


@pytest.mark.integration
@pytest.mark.slow
def test_search_logs_nested_trials_and_publishes_the_best(settings, tmp_path: Path,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    uris = run_stages(settings, "run-t", write_small_source(tmp_path))
    parent = tracking.pipeline_run(settings, "run-t", "small")
    config = TuneConfig.model_validate({"num_samples": 4, "max_epochs": 6, "grace_period": 2, "search_space": SPACE,
                                        "max_concurrent_trials": 2})
    with ActorProcesses("ImplicitFunc") as trial_processes:
        manifest = tune(uris["preprocess"], TrainConfig(patience=100), config,
                        storage.stage_uri(settings, "run-t", "tune"), settings, "tune-run-t", parent)
    assert 1 <= len(trial_processes.pids) <= 2  # 4 trials, 2 at a time: later trials reuse the ended ones' actors
    trials = json.loads((Path(storage.stage_uri(settings, "run-t", "tune")) / "trials.json").read_text())
    assert manifest["trials"] == len(trials) == 4
    assert manifest["best_config"] == min(trials, key=lambda t: t["val_loss"])["config"]
    assert manifest["best_config"]["hidden_sizes"] in ([8], [16, 8])
    assert all(1 <= t["epochs"] <= 6 for t in trials) and manifest["epochs"] == sum(t["epochs"] for t in trials)
    progress = [line for line in capfd.readouterr().out.splitlines() if line.startswith("tune: trial ")]
    assert [line.split(" ended")[0] for line in progress] == [f"tune: trial {n} of 4" for n in range(1, 5)]
    assert sorted(int(line.split("after ")[1].split(" of")[0]) for line in progress) \
        == sorted(t["epochs"] for t in trials)  # a line as each trial ends, with its epochs
    assert "(0 running)" in progress[-1]  # the last to end leaves none running
    children = mlflow.MlflowClient(settings.mlflow_tracking_uri).search_runs(
        [tracking.mlflow_client(settings).get_run(parent).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 4 and all(c.data.metrics["best_val_loss"] > 0 for c in children)
    assert tracking.pipeline_run(settings, "run-t", "small") == parent  # children don't shadow the run


@pytest.mark.integration
@pytest.mark.slow
def test_a_search_one_trial_at_a_time_repeats_exactly_from_its_seed(settings, tmp_path: Path) -> None:
    """The README's promise for a reproducible search: with ``max_concurrent_trials: 1`` the seed fixes what TPE
    proposes, what ASHA stops and every trial's training, so a second search gives the same trials."""
    uris = run_stages(settings, "run-r", write_small_source(tmp_path))
    config = TuneConfig.model_validate({"num_samples": 4, "max_epochs": 6, "grace_period": 2, "search_space": SPACE,
                                        "max_concurrent_trials": 1, "seed": 7})

    def trials(attempt: int) -> list[tuple]:
        output = storage.stage_uri(settings, f"run-r{attempt}", "tune")
        tune(uris["preprocess"], TrainConfig(patience=100), config, output, settings, f"tune-run-r{attempt}")
        return [(t["config"], t["epochs"], round(t["val_loss"], 6))
                for t in json.loads((Path(output) / "trials.json").read_text())]

    first = trials(1)
    assert len({json.dumps(config) for config, _, _ in first}) == 4  # four different proposals, not one repeated
    assert trials(2) == first
