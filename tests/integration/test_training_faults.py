"""Training survives failures: a killed Ray Train worker, a killed driver, and failures beyond the budget.

Real Ray, real processes, real SIGKILLs. Each run checkpoints every epoch; a
restart must resume from the latest checkpoint (at most the epoch in flight is
redone) and end where an uninterrupted run ends.
"""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch

from keel import storage
from keel.data.ingest import ingest
from keel.data.preprocess import preprocess
from keel.errors import TrainingError
from keel.predictor import Predictor
from keel.settings import KeelSettings
from keel.train.config import TrainConfig
from keel.train.loop import STATE_FILE
from keel.train.trainer import train
from tests.conftest import small_frame
from tests.processes import ray_actor_pids
from tests.stages import small_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]
EPOCHS = 8
# Big enough that an epoch takes a moment (so a kill lands mid-run), small enough for 2 cores.
CONFIG = TrainConfig(hidden_sizes=[256, 256], batch_size=32, max_epochs=EPOCHS, patience=100, max_failures=2,
                     mlflow_flush_interval_s=0)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[KeelSettings, str]:
    directory = tmp_path_factory.mktemp("faults")
    settings = KeelSettings(home=directory / ".keel")
    source = directory / "rows.csv"
    small_frame(8000, seed=3).to_csv(source, index=False)
    config = small_config()
    dataset, splits = (storage.stage_uri(settings, "faults", s) for s in ("ingest", "preprocess"))
    ingest(str(source), dataset, settings)
    preprocess(dataset, config.contract, config.preprocess, splits, settings)
    return settings, splits


def latest_checkpoint_epoch(checkpoints: Path) -> int:
    """The epoch of the newest complete checkpoint under a Ray Train run's storage (0: none yet)."""
    epochs = [0]
    # glob (unlike Path.rglob) skips directories that Ray prunes while we look
    for state_file in glob.glob(str(checkpoints / "**" / STATE_FILE), recursive=True):
        try:
            epochs.append(torch.load(state_file, map_location="cpu", weights_only=False)["state"].epoch)
        except Exception:  # noqa: BLE001 - a checkpoint being written or pruned right now
            continue
    return max(epochs)


def committed_checkpoint_epoch(checkpoints: Path) -> int:
    """The newest epoch Ray Train has committed (named in its checkpoint-manager snapshot; 0: none).

    A restarted driver resumes from what the snapshot lists, not from whatever is on disk.
    """
    epochs = [0]
    for snapshot in glob.glob(str(checkpoints / "**" / "checkpoint_manager_snapshot.json"), recursive=True):
        try:
            names = set(re.findall(r"checkpoint_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}\.\d+", Path(snapshot).read_text()))
            for name in names:
                state = Path(snapshot).parent / name / STATE_FILE
                epochs.append(torch.load(state, map_location="cpu", weights_only=False)["state"].epoch)
        except Exception:  # noqa: BLE001 - a snapshot or checkpoint being rewritten right now
            continue
    return max(epochs)


def ray_train_workers() -> list[int]:
    return ray_actor_pids("RayTrainWorker")


def when(condition: Callable[[], bool], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


def accuracy(model_uri: str, splits_uri: str, settings: KeelSettings) -> float:
    predictor = Predictor.load(Path(model_uri))
    raw = pd.read_parquet(storage.read_manifest(splits_uri, settings)["raw_test"])
    predicted = predictor.predict(raw.drop(columns=["outcome"]))["prediction"]
    return float((predicted == raw["outcome"]).mean())


def run_train(settings: KeelSettings, splits: str, name: str, config: TrainConfig = CONFIG) -> tuple[dict, str]:
    output = storage.stage_uri(settings, name, "train")
    checkpoints = storage.join(storage.run_uri(settings, name), "checkpoints")
    return train(splits, config, output, checkpoints, settings, run_name=name), output


@pytest.fixture(scope="module")
def uninterrupted(workspace: tuple[KeelSettings, str]) -> float:
    settings, splits = workspace
    manifest, output = run_train(settings, splits, "uninterrupted")
    assert manifest["epochs"] == EPOCHS and manifest["resumed_from_epochs"] == []
    return accuracy(output, splits, settings)


def test_a_killed_worker_resumes_from_the_last_checkpoint(workspace: tuple[KeelSettings, str],
                                                          uninterrupted: float) -> None:
    settings, splits = workspace
    checkpoints = Path(storage.join(storage.run_uri(settings, "worker-killed"), "checkpoints"))
    killed: dict[str, int] = {}

    def kill_a_worker_mid_run() -> None:
        when(lambda: latest_checkpoint_epoch(checkpoints) >= 3 and bool(ray_train_workers()))
        killed["pid"] = ray_train_workers()[0]
        killed["completed_epochs"] = latest_checkpoint_epoch(checkpoints)  # on disk when the worker dies
        # a one-machine Ray is never drained: Ray Train's preemption watcher is not started (its controller is)
        killed["actors"] = {name: len(ray_actor_pids(name)) for name in ("TrainController", "PreemptionWatcher")}
        os.kill(killed["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_a_worker_mid_run, daemon=True)
    killer.start()
    manifest, output = run_train(settings, splits, "worker-killed")
    killer.join(timeout=5)
    assert "pid" in killed, "the worker was never killed: training ended first"
    print(f"worker killed with {killed['completed_epochs']} epochs on disk, resumed from "
          f"{manifest['resumed_from_epochs']}, accuracy {accuracy(output, splits, settings):.4f} vs "
          f"{uninterrupted:.4f} uninterrupted")
    assert manifest["epochs"] == EPOCHS
    assert killed["actors"] == {"TrainController": 1, "PreemptionWatcher": 0}
    (resumed_at,) = manifest["resumed_from_epochs"]
    # At most one completed epoch is redone: the newest checkpoint may be on disk but not yet committed
    # by Ray Train's controller when the worker dies (then Ray resumes from the one before it).
    assert resumed_at >= killed["completed_epochs"] - 1
    assert abs(accuracy(output, splits, settings) - uninterrupted) <= 0.01


def test_a_restarted_driver_resumes_its_run(workspace: tuple[KeelSettings, str], tmp_path: Path) -> None:
    settings, splits = workspace
    name = "driver-restarted"
    checkpoints = Path(storage.join(storage.run_uri(settings, name), "checkpoints"))
    script = (f"from keel.settings import KeelSettings\nfrom keel.train.config import TrainConfig\n"
              f"from tests.integration.test_training_faults import run_train\n"
              f"run_train(KeelSettings(home={str(settings.home)!r}), {splits!r}, {name!r})\n")
    driver = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[2], start_new_session=True,
                              stdout=(tmp_path / "driver.log").open("w"), stderr=subprocess.STDOUT)
    try:
        when(lambda: committed_checkpoint_epoch(checkpoints) >= 3 or driver.poll() is not None)
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-2000:]
        checkpointed = committed_checkpoint_epoch(checkpoints)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait(timeout=30)
    when(lambda: not ray_train_workers(), timeout_s=60)
    manifest, _ = run_train(settings, splits, name)
    assert manifest["epochs"] == EPOCHS
    assert manifest["resumed_from_epochs"] and manifest["resumed_from_epochs"][0] >= checkpointed


def test_failures_beyond_the_budget_fail_the_run_and_publish_nothing(workspace: tuple[KeelSettings, str]) -> None:
    settings, splits = workspace
    config = CONFIG.model_copy(update={"max_failures": 1})
    stop = threading.Event()

    def kill_every_worker() -> None:
        while not stop.is_set():
            for pid in ray_train_workers():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)

    killer = threading.Thread(target=kill_every_worker, daemon=True)
    killer.start()
    try:
        with pytest.raises(TrainingError, match="training failed"):
            run_train(settings, splits, "beyond-budget", config)
    finally:
        stop.set()
        killer.join(timeout=5)
    assert not storage.exists(storage.stage_uri(settings, "beyond-budget", "train"), settings)
