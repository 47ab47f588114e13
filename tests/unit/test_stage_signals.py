"""A step's pod told to stop (SIGTERM: Kubeflow terminating the run, a node drained) ends as an exception ends it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keel import tracking
from keel.settings import KeelSettings
from tests.stages import small_config

STEP = """
import pathlib, sys, time
import mlflow
from keel import storage, tracking
from keel.runs import open_stage

with open_stage("register", "stopped-run", "job", sys.argv[1]) as run:
    run_id = tracking.pipeline_run(run.settings, "stopped-run", "small")
    with storage.staged_output(sys.argv[2], "register", run.settings) as out, mlflow.start_run(run_id=run_id):
        out.write_json("half.json", {})
        pathlib.Path(sys.argv[3]).touch()
        time.sleep(120)
"""


def test_sigterm_to_a_step_cleans_up_as_a_failure_does(settings: KeelSettings, tmp_path: Path) -> None:
    """Python ended on SIGTERM at once: the step's staging directory stayed, its MLflow run stayed RUNNING, and a
    register step's new version stayed in the registry (its clean-up is the same `except BaseException`)."""
    target, ready = tmp_path / "run" / "register", tmp_path / "ready"
    step = subprocess.Popen([sys.executable, "-c", STEP, small_config().to_json(), str(target), str(ready)])
    deadline = time.monotonic() + 120
    while not ready.exists() and step.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ready.exists(), "the step never reached its work"
    step.send_signal(signal.SIGTERM)
    assert step.wait(timeout=60) == 143  # as a shell reports a process SIGTERM ended
    assert not target.exists() and list(target.parent.iterdir()) == []  # nothing published, no staging left
    client = tracking.mlflow_client(settings)
    (run,) = client.search_runs([tracking.experiment_id(client, settings, "small")])
    assert run.info.status == "FAILED"


def test_kill_ends_a_keel_command_as_an_error_ends_it(monkeypatch) -> None:
    """`kill` ended a `keel predict` on the spot, its staging directory left beside the destination."""
    import os

    import keel.cli

    cleaned: list[bool] = []
    before = signal.getsignal(signal.SIGTERM)

    def command() -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        finally:
            cleaned.append(True)  # what staged_output's clean-up does

    monkeypatch.setattr(keel.cli, "app", command)
    with pytest.raises(SystemExit) as ended:
        keel.cli.main()
    assert ended.value.code == 143 and cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) == before
