"""Train through the Ray Job Submission API, as the pipeline does on a KubeRay cluster.

The head is a real `ray start --head` on 127.0.0.1: the same dashboard, Job
Submission API and job supervisor a KubeRay head service exposes. The train
step submits `python -m keel.jobs train ...`, streams the job's log, and gets
the published model's manifest back, or the job's own error when it fails.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

import keel
from keel import jobs, storage
from keel.data.ingest import ingest
from keel.data.preprocess import preprocess
from keel.errors import TrainingError
from keel.serve.control import HeadPorts, end_process_group
from keel.settings import KeelSettings
from keel.train.config import TrainConfig
from tests.integration.conftest import private_head_ports
from tests.stages import small_config, write_small_source

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(autouse=True)
def ray_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", RAY_TOKEN)  # what the chart's pods read from the Secret
RAY = str(Path(sys.executable).with_name("ray"))


RAY_TOKEN = secrets.token_hex(32)


HEAD_STARTS = 3  # each with fresh ports; see why_head_takes_no_jobs


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A head with Ray's token auth on, as the chart configures it (the token would come from the Secret)."""
    failures: list[str] = []
    for _ in range(HEAD_STARTS):
        head, url, temp_dir = start_head(tmp_path_factory)
        try:
            failure = why_head_takes_no_jobs(url, temp_dir)
            if not failure:
                yield url
                return
            failures.append(failure)
            print(f"Ray head at {url} takes no jobs, starting another: {failure}", file=sys.stderr)
        finally:
            end_process_group(head.pid)
            shutil.rmtree(temp_dir, ignore_errors=True)
    pytest.fail(f"no Ray head of {HEAD_STARTS} took a job:\n" + "\n".join(failures))


def start_head(tmp_path_factory: pytest.TempPathFactory,
               ports: HeadPorts | None = None) -> tuple[subprocess.Popen[str], str, str]:
    ports = ports or private_head_ports()
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                   "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": RAY_TOKEN}
    # A process group of its own, ended alone afterwards: `ray stop` would end every Ray on the machine.
    # So that another test's head can run beside it: free ports instead of Ray's fixed ones, and a temp dir
    # of its own (a job's driver finds its cluster as "the latest `ray start`" recorded in the temp dir).
    temp_dir = tempfile.mkdtemp(prefix="ray-jobs-")  # short: Ray's socket paths live under it
    head = subprocess.Popen([RAY, "start", "--head", "--port=0", "--num-cpus=2", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={ports.dashboard}", f"--ray-client-server-port={ports.client_server}",
                             f"--dashboard-agent-listen-port={ports.dashboard_agent}", f"--temp-dir={temp_dir}",
                             "--disable-usage-stats"],
                            env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path_factory.mktemp("ray-head"), start_new_session=True)
    log, _ = head.communicate(timeout=240)
    if head.returncode != 0:
        end_process_group(head.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
        pytest.fail(f"ray start --head exited {head.returncode}: {log[-2000:]}")
    return head, f"http://127.0.0.1:{ports.dashboard}", temp_dir


def why_head_takes_no_jobs(url: str, temp_dir: str, wait_s: float = 90) -> str:
    """Why the head takes no job, or "" once it took a no-op one.

    ``free_port()`` only finds a port free for now: another test's Ray, starting beside this one, can take it
    first. A dashboard agent that then cannot bind its port leaves a head whose ``ray start`` exited 0 and
    whose dashboard answers every submission "No available agent" for good (a CI failure: all four job tests).
    """
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(url, headers={"Authorization": f"Bearer {RAY_TOKEN}"})
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.submit_job(entrypoint="true", metadata={"purpose": "the head's job agent is up"})
            return ""
        except RuntimeError as e:
            bind_errors = agent_bind_errors(temp_dir)
            if jobs.AGENT_NOT_READY not in str(e) or bind_errors or time.monotonic() > deadline:
                return bind_errors[-1] if bind_errors else str(e)
        time.sleep(2.0)


def agent_bind_errors(temp_dir: str) -> list[str]:
    """The lines where the head's dashboard agent says it could not bind its port."""
    return [line for log in Path(temp_dir).glob("session_latest/logs/dashboard_agent.*")
            for line in log.read_text(errors="replace").splitlines() if "address already in use" in line]


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> tuple[KeelSettings, str]:
    directory = tmp_path_factory.mktemp("jobs")
    settings = KeelSettings(home=directory / ".keel")
    config = small_config()
    dataset, prepared = (storage.stage_uri(settings, "jobs", s) for s in ("ingest", "preprocess"))
    ingest(str(write_small_source(directory)), dataset, settings)
    preprocess(dataset, config.contract, config.preprocess, prepared, settings)
    return settings, prepared


def train_arguments(settings: KeelSettings, splits_uri: str, name: str) -> dict:
    return {"splits_uri": splits_uri, "output_uri": storage.stage_uri(settings, name, "train"),
            "checkpoint_uri": storage.join(storage.run_uri(settings, name), "checkpoints"),
            "config": TrainConfig(hidden_sizes=[8], max_epochs=3, batch_size=32).model_dump(), "run_name": name}


def test_training_runs_as_a_ray_job_and_publishes_the_model(ray_head: str, splits: tuple[KeelSettings, str],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from ray.job_submission import JobSubmissionClient

    from keel.serve.control import ray_auth_headers

    local, splits_uri = splits
    settings = local.model_copy(update={"ray_address": ray_head, "s3_secret_key": SecretStr("very-secret")})
    arguments = train_arguments(settings, splits_uri, "as-a-job")
    manifest = jobs.run_stage("train", arguments, settings)
    assert manifest["epochs"] == 3 and manifest["scaling"]["num_workers"] >= 1
    assert storage.read_manifest(arguments["output_uri"], settings)["epochs"] == 3  # published where the step looks
    streamed = capsys.readouterr().out
    assert f"to {ray_head}" in streamed and jobs.RESULT_MARKER in streamed  # the job's own log reached ours
    (job,) = [j for j in JobSubmissionClient(ray_head, headers=ray_auth_headers()).list_jobs() if j.metadata.get("keel.stage") == "train"]
    assert str(job.status.value) == "SUCCEEDED" and "python -m keel.jobs train" in job.entrypoint
    assert "very-secret" not in json.dumps(job.runtime_env or {})
    # the step's own code, not the copy installed where the job runs: uploaded, and imported from Ray's copy
    (shipped,) = job.runtime_env["py_modules"]
    assert shipped.startswith("gcs://")
    imported_from = next(line for line in streamed.splitlines() if line.startswith(f"keel {keel.__version__} from "))
    assert "runtime_resources" in imported_from and str(Path(keel.__file__).parent) not in imported_from


def test_a_failed_job_raises_its_own_error_and_publishes_nothing(ray_head: str, splits: tuple[KeelSettings, str],
                                                                 tmp_path: Path) -> None:
    local, _ = splits
    settings = local.model_copy(update={"ray_address": ray_head})
    arguments = train_arguments(settings, str(tmp_path / "no-such-splits"), "failing-job")
    with pytest.raises(TrainingError, match="ended FAILED") as failure:
        jobs.run_stage("train", arguments, settings)
    assert "no-such-splits" in str(failure.value)  # the remote stage's message, not just "it failed"
    assert not storage.exists(arguments["output_uri"], settings)


@pytest.mark.parametrize("authorization, status", [(None, 401), ("Bearer " + "0" * 64, 403)])
def test_the_job_api_refuses_requests_without_the_token(ray_head: str, authorization: str | None,
                                                        status: int) -> None:
    request = urllib.request.Request(f"{ray_head}/api/jobs/", headers={"Authorization": authorization}
                                     if authorization else {})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == status  # Ray: 401 without a token, 403 with a wrong one
    with urllib.request.urlopen(urllib.request.Request(f"{ray_head}/api/jobs/", headers={
            "Authorization": f"Bearer {RAY_TOKEN}"}), timeout=30) as accepted:
        assert accepted.status == 200


def test_batch_scoring_on_ray_runs_as_a_ray_job_on_the_cluster(ray_head: str, splits: tuple[KeelSettings, str],
                                                               tmp_path: Path) -> None:
    import pandas as pd

    from keel.batch import PredictConfig, score_table
    from keel.batch.distributed import PARTS_DIRECTORY
    from keel.predictor import Predictor
    from tests.stages import register_small_model
    from tests.unit.test_batch import MODEL_URI, rows_to_score

    local, _ = splits
    trained = register_small_model(local, "jobs-predict", epochs=5)["train"]
    rows = rows_to_score(40)
    rows.to_parquet(tmp_path / "rows.parquet", index=False)
    settings = local.model_copy(update={"ray_address": ray_head})
    manifest = score_table(MODEL_URI, str(tmp_path / "rows.parquet"), str(tmp_path / "out"), settings,
                           PredictConfig(keep=["customer"], engine="ray", workers=1))
    assert manifest["engine"] == "ray" and manifest["rows"] == 40  # the job's manifest, through its log
    scored = pd.read_parquet(tmp_path / "out" / PARTS_DIRECTORY).set_index("customer")
    expected = Predictor.load(Path(trained)).predict(rows).set_axis(rows["customer"])
    pd.testing.assert_frame_equal(scored.loc[expected.index], expected, check_dtype=False, atol=1e-6,
                                  check_names=False)


def test_a_step_ended_while_its_job_trains_stops_the_job(ray_head: str, splits: tuple[KeelSettings, str],
                                                         tmp_path: Path) -> None:
    """Kubeflow terminating a run sends SIGTERM to the step's pod. The job trained on without its step: holding
    the cluster to its last epoch, publishing into an ended run, and training beside the step's retry."""
    import signal
    import time

    from ray.job_submission import JobSubmissionClient

    from keel.serve.control import ray_auth_headers

    local, splits_uri = splits
    arguments = train_arguments(local, splits_uri, "terminated")
    arguments["config"] = TrainConfig(hidden_sizes=[8], max_epochs=100_000, batch_size=32,
                                      patience=100_000).model_dump()
    script = (f"import json, sys\nfrom keel import jobs\nfrom keel.settings import KeelSettings\n"
              f"settings = KeelSettings(home={str(local.home)!r}, ray_address={ray_head!r})\n"
              f"jobs.run_stage('train', json.loads(sys.argv[1]), settings)\n")
    log = tmp_path / "step.log"
    with log.open("w") as output:
        step = subprocess.Popen([sys.executable, "-c", script, json.dumps(arguments)], stdout=output,
                                stderr=subprocess.STDOUT, text=True)
    client = JobSubmissionClient(ray_head, headers=ray_auth_headers())
    deadline, job_id = time.monotonic() + 120, ""
    while time.monotonic() < deadline and step.poll() is None:
        submitted = [line.split()[3] for line in log.read_text().splitlines() if line.startswith("Submitted Ray job")]
        if submitted and str(client.get_job_status(submitted[0]).value) == "RUNNING":
            job_id = submitted[0]
            break
        time.sleep(0.5)
    assert job_id, log.read_text()[-3000:]
    time.sleep(5)  # into its epochs
    step.send_signal(signal.SIGTERM)
    assert step.wait(timeout=60) == 143, log.read_text()[-3000:]
    assert f"Stopped Ray job {job_id}: its step ended first." in log.read_text()
    while str(client.get_job_status(job_id).value) not in jobs.TERMINAL and time.monotonic() < deadline + 60:
        time.sleep(1)
    assert str(client.get_job_status(job_id).value) == "STOPPED"
    assert not storage.exists(arguments["output_uri"], local)


def test_a_head_whose_job_agent_is_dead_fails_the_step_with_the_cause_and_the_fix(
        tmp_path_factory: pytest.TempPathFactory, splits: tuple[KeelSettings, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The failure the fixture above retries past, as a user meets it: ``ray start`` exits 0, the dashboard
    answers, and every submission gets Ray's "No available agent" for good."""
    local, splits_uri = splits
    ports = private_head_ports()
    with socket.socket() as holder:  # what takes the agent's port first, on a cluster or in CI
        holder.bind(("0.0.0.0", ports.dashboard_agent))
        holder.listen()
        head, url, temp_dir = start_head(tmp_path_factory, ports)
        try:
            monkeypatch.setattr(jobs, "AGENT_WAIT_S", 10.0)
            settings = local.model_copy(update={"ray_address": url})
            with pytest.raises(TrainingError) as failure:
                jobs.run_stage("train", train_arguments(settings, splits_uri, "dead-agent"), settings)
            bind_errors = agent_bind_errors(temp_dir)
        finally:
            end_process_group(head.pid)
            shutil.rmtree(temp_dir, ignore_errors=True)
    assert bind_errors  # the cause the message points to is the real one
    message = str(failure.value)
    assert f"Ray head at {url} answered '{jobs.AGENT_NOT_READY}' to the train job for 10 s" in message
    assert "session_latest/logs/dashboard_agent.log" in message and "delete the head pod" in message
    assert not storage.exists(storage.stage_uri(settings, "dead-agent", "train"), settings)
