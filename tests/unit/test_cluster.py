"""Cluster-facing code without a cluster: KFP submission, RayService rollout, status and Ray job plumbing.

What needs a live API server (a real upload, a real patch) runs in `make e2e-cluster`;
here every decision Keel makes on the way there is checked, and every way of
not reaching a cluster must end in an error that says what to do.
"""

from __future__ import annotations

import json
import shlex
import socket
import warnings
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml
from typer.testing import CliRunner

from keel import __version__, cluster, images, jobs, submit
from keel.cli import app
from keel.errors import ClusterError, ConfigError
from keel.settings import KeelSettings


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- keel submit / schedule ---------------------------------------------------------------------

def test_versions_are_named_by_package_version_and_commit() -> None:
    assert submit.version_name("0123456789abcdef0123") == f"{__version__}-0123456789ab"
    assert submit.version_name("") == f"{__version__}-unknown"


@pytest.mark.parametrize("given, expected", [("0 3 * * *", "0 0 3 * * *"), ("*/15 * * * * *", "*/15 * * * * *"),
                                             ("0 0 9 * * MON-FRI", "0 0 9 * * MON-FRI")])
def test_cron_expressions_become_kfp_six_field_ones(given: str, expected: str) -> None:
    assert submit.kfp_cron(given) == expected


@pytest.mark.parametrize("bad", ["daily", "0 3 * *", "0 3 * * * * *", "0 3 * * ; rm"])
def test_bad_cron_expressions_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="expected a crontab expression"):
        submit.kfp_cron(bad)


def test_an_unreachable_kfp_host_is_named_in_the_error() -> None:
    host = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(ClusterError, match=f"cannot reach Kubeflow Pipelines at {host}"):
        submit.check_reachable(host, timeout_s=2)


def test_keel_submit_to_an_unreachable_host_exits_1_with_the_reason() -> None:
    host = f"http://127.0.0.1:{closed_port()}"
    result = CliRunner().invoke(app, ["submit", "medical_diagnosis", "--host", host, "--param", "gpus=1"])
    assert result.exit_code == 1 and isinstance(result.exception, ClusterError)
    assert host in str(result.exception)


@pytest.mark.parametrize("command", [["submit"], ["schedule", "--cron", "0 3 * * *"]])
def test_a_source_on_this_machine_is_refused_before_kfp_is_asked(command: list[str], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The steps run in the cluster's pods: a local file would fail each of them after its image pull."""
    host = f"http://127.0.0.1:{closed_port()}"  # asked, it would fail naming the host
    (tmp_path / "titanic.csv").write_text("a,b\n1,2\n")
    monkeypatch.chdir(tmp_path)
    for source in ("titanic.csv", str(tmp_path / "titanic.csv"), f"file://{tmp_path / 'titanic.csv'}"):
        result = CliRunner().invoke(app, [command[0], "medical_diagnosis", *command[1:], "--host", host,
                                          "--param", f"source={source}"])
        assert result.exit_code == 1 and isinstance(result.exception, ConfigError), result.output
        assert str(result.exception).startswith(f"--param source={source}: a file on this machine")
    for source in ("s3://lake/titanic.csv", "https://example.org/t.csv", "builtin://breast_cancer",
                   "/mnt/on-the-cluster/t.csv"):
        result = CliRunner().invoke(app, ["submit", "medical_diagnosis", "--host", host, "--param",
                                          f"source={source}"])
        assert isinstance(result.exception, ClusterError) and host in str(result.exception)  # on to KFP


def test_keel_schedule_refuses_a_bad_cron_before_anything_else() -> None:
    result = CliRunner().invoke(app, ["schedule", "medical_diagnosis", "--cron", "nightly", "--host", "http://x"])
    assert result.exit_code == 1 and "crontab" in str(result.exception)


class RecordingKfp:
    """Answers like kfp.Client for one pipeline, recording what Keel asks of it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.versions: list[SimpleNamespace] = []
        self.pipeline_id: str | None = None
        self.recurring: list[Any] = []

    def get_pipeline_id(self, name: str) -> str | None:
        return self.pipeline_id

    def upload_pipeline(self, path: str, pipeline_name: str) -> SimpleNamespace:
        with open(path) as package:
            documents = list(yaml.safe_load_all(package))  # the pipeline spec, then its Kubernetes platform spec
        self.calls.append(("upload_pipeline", {"name": pipeline_name, "spec": documents[0], "platform": documents[1]}))
        self.pipeline_id = "p-1"
        return SimpleNamespace(pipeline_id="p-1")

    def list_pipeline_versions(self, pipeline_id: str, page_size: int) -> SimpleNamespace:
        return SimpleNamespace(pipeline_versions=self.versions)

    def upload_pipeline_version(self, path: str, pipeline_version_name: str, pipeline_id: str) -> SimpleNamespace:
        self.calls.append(("upload_pipeline_version", {"name": pipeline_version_name}))
        self.versions.append(SimpleNamespace(display_name=pipeline_version_name,
                                             pipeline_version_id=f"v-{len(self.versions) + 1}"))
        return SimpleNamespace(pipeline_version_id=self.versions[-1].pipeline_version_id)

    def create_experiment(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(experiment_id=f"e-{name}")

    def run_pipeline(self, experiment_id: str, job_name: str, **kwargs: Any) -> SimpleNamespace:
        self.calls.append(("run_pipeline", {"experiment_id": experiment_id, "job_name": job_name, **kwargs}))
        return SimpleNamespace(run_id="r-1")

    def create_recurring_run(self, experiment_id: str, job_name: str, **kwargs: Any) -> Any:
        from kfp_server_api import V2beta1CronSchedule, V2beta1RecurringRun, V2beta1Trigger

        self.calls.append(("create_recurring_run", {"experiment_id": experiment_id, "job_name": job_name, **kwargs}))
        self.recurring.append(V2beta1RecurringRun(
            recurring_run_id=f"rr-{len(self.calls)}", display_name=job_name, experiment_id=experiment_id,
            description=kwargs.get("description"), status="ENABLED",
            trigger=V2beta1Trigger(cron_schedule=V2beta1CronSchedule(cron=kwargs["cron_expression"]))))
        return self.recurring[-1]

    def get_experiment(self, experiment_name: str) -> SimpleNamespace:
        if not any(run.experiment_id == f"e-{experiment_name}" for run in self.recurring):
            raise ValueError(f"No experiment is found with name {experiment_name}.")  # as kfp.Client says it
        return SimpleNamespace(experiment_id=f"e-{experiment_name}")

    def list_recurring_runs(self, page_token: str, page_size: int, experiment_id: str) -> Any:
        """Two to a page, so that paging is exercised."""
        from kfp_server_api import V2beta1ListRecurringRunsResponse

        mine = [run for run in self.recurring if run.experiment_id == experiment_id]
        start = int(page_token or 0)
        return V2beta1ListRecurringRunsResponse(recurring_runs=mine[start:start + 2], total_size=len(mine),
                                                next_page_token=str(start + 2) if start + 2 < len(mine) else "")

    def disable_recurring_run(self, recurring_run_id: str) -> dict[str, Any]:
        return self._set_status(recurring_run_id, "DISABLED")

    def enable_recurring_run(self, recurring_run_id: str) -> dict[str, Any]:
        return self._set_status(recurring_run_id, "ENABLED")

    def _set_status(self, recurring_run_id: str, status: str) -> dict[str, Any]:
        (run,) = [run for run in self.recurring if run.recurring_run_id == recurring_run_id]
        run.status = status
        return {}

    def delete_recurring_run(self, recurring_run_id: str) -> dict[str, Any]:
        self.calls.append(("delete_recurring_run", {"id": recurring_run_id}))
        self.recurring = [run for run in self.recurring if run.recurring_run_id != recurring_run_id]
        return {}


def test_submit_uploads_a_version_once_and_runs_it_as_the_pipeline_runner() -> None:
    kfp = RecordingKfp()
    first = submit.submit(kfp, "medical_diagnosis", "http://kfp", "nightly", {"gpus": 1}, "abcdef1234567890")
    again = submit.submit(kfp, "medical_diagnosis", "http://kfp", "nightly", {"gpus": 1}, "abcdef1234567890")
    uploads = [c for c in kfp.calls if c[0].startswith("upload")]
    assert [c[0] for c in uploads] == ["upload_pipeline", "upload_pipeline_version"]  # the second run reuses it
    assert uploads[0][1]["spec"]["pipelineInfo"]["name"] == "medical-diagnosis"
    executors = uploads[0][1]["platform"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert all(e["secretAsEnv"] and e["configMapAsEnv"] for e in executors.values())  # every step gets both
    runs = [c[1] for c in kfp.calls if c[0] == "run_pipeline"]
    assert len(runs) == 2 and runs[0]["version_id"] == again.version_id == first.version_id == "v-1"
    assert runs[0]["params"] == {"gpus": 1} and runs[0]["service_account"] == "keel-pipeline-runner"
    assert first.url == "http://kfp/#/runs/details/r-1" and first.version_name.endswith("-abcdef123456")


def test_submit_with_another_image_uploads_steps_on_it_as_a_version_of_its_own(monkeypatch) -> None:
    """The same commit on Keel's image and on a platform team's build (by digest here) are two versions, so a
    resubmission never reuses one that pulls the other image; KEEL_IMAGE is the default for --image."""
    kfp = RecordingKfp()
    monkeypatch.setattr(submit, "client_for", lambda host, token, namespace: kfp)
    monkeypatch.setenv("KEEL_GIT_COMMIT", "abcdef1234567890")
    private = "registry.example.com/ml/keel-runtime@sha256:" + "0" * 64
    monkeypatch.setenv("KEEL_IMAGE", private)
    on_private = CliRunner().invoke(app, ["submit", "medical_diagnosis", "--host", "http://kfp", "-o", "json"])
    on_own = CliRunner().invoke(app, ["submit", "medical_diagnosis", "--host", "http://kfp", "-o", "json",
                                      "--image", images.RUNTIME_IMAGE])
    assert on_private.exit_code == 0 and on_own.exit_code == 0, on_private.output + on_own.output
    uploaded = [c[1] for c in kfp.calls if c[0] == "upload_pipeline"][0]["spec"]
    assert {e["container"]["image"] for e in uploaded["deploymentSpec"]["executors"].values()} == {private}
    names = [json.loads(r.stdout)["version_name"] for r in (on_private, on_own)]
    assert names[1] == f"{__version__}-abcdef123456" and names[0].startswith(f"{names[1]}-") and len(set(names)) == 2
    assert [c[1]["name"] for c in kfp.calls if c[0] == "upload_pipeline_version"] == names
    wrong = CliRunner().invoke(app, ["submit", "medical_diagnosis", "--host", "http://kfp", "--image", "keel:latest "])
    assert wrong.exit_code == 1 and "--image 'keel:latest '" in str(wrong.exception)


def test_schedule_creates_one_recurring_run_without_catch_up() -> None:
    kfp = RecordingKfp()
    scheduled = submit.submit(kfp, "medical_diagnosis", "http://kfp", "keel", {}, "c0ffee", cron="0 3 * * *")
    (recurring,) = [c[1] for c in kfp.calls if c[0] == "create_recurring_run"]
    assert recurring["cron_expression"] == "0 0 3 * * *" and recurring["max_concurrency"] == 1
    assert recurring["no_catchup"] is True and recurring["job_name"] == "medical-diagnosis"
    assert scheduled.run_id == kfp.recurring[0].recurring_run_id and scheduled.replaced == ()


def test_scheduling_again_replaces_the_run_of_that_name_and_leaves_the_others() -> None:
    kfp = RecordingKfp()
    for name in ("weekly", "monthly", "yearly"):  # other schedules of the pipeline, and enough to page through
        submit.submit(kfp, "medical_diagnosis", "http://kfp", "keel", {}, "c0ffee", cron="0 3 1 * *",
                      schedule_name=name)
    first = submit.submit(kfp, "medical_diagnosis", "http://kfp", "keel", {}, "c0ffee", cron="0 3 * * *")
    second = submit.submit(kfp, "medical_diagnosis", "http://kfp", "keel", {"gpus": 1}, "beef00", cron="0 4 * * *")
    assert second.replaced == (first.run_id,)  # one nightly run, on the newest commit
    rows = submit.list_schedules(kfp, "keel")
    assert sorted(r["name"] for r in rows) == ["medical-diagnosis", "monthly", "weekly", "yearly"]
    (nightly,) = [r for r in rows if r["name"] == "medical-diagnosis"]
    assert nightly["id"] == second.run_id and nightly["cron"] == "0 0 4 * * *"
    assert nightly["description"].endswith("-beef00, cron 0 4 * * *")
    assert submit.change_schedules(kfp, "keel", "weekly", "delete") and {
        r["name"] for r in submit.list_schedules(kfp, "keel")} == {"medical-diagnosis", "monthly", "yearly"}
    with pytest.raises(ClusterError, match="no recurring run named 'weekly' in experiment 'keel'"):
        submit.change_schedules(kfp, "keel", "weekly", "pause")
    with pytest.raises(ClusterError, match=r"no experiment 'nightly' on Kubeflow Pipelines \(--experiment\)"):
        submit.list_schedules(kfp, "nightly")


def test_keel_schedule_list_delete_and_a_missing_cron(monkeypatch: pytest.MonkeyPatch) -> None:
    kfp = RecordingKfp()
    monkeypatch.setattr(submit, "client_for", lambda host, token, namespace: kfp)
    runner, host = CliRunner(), ["--host", "http://kfp"]
    created = runner.invoke(app, ["schedule", "medical_diagnosis", "--cron", "0 3 * * *", *host])
    (nightly,) = kfp.recurring
    assert created.exit_code == 0 and f"Recurring run (0 3 * * *) {nightly.recurring_run_id} " in created.stdout
    again = runner.invoke(app, ["schedule", "medical_diagnosis", "--cron", "0 5 * * *", *host])
    assert again.exit_code == 0 and f"it replaces {nightly.recurring_run_id} of the same name" in again.stdout
    listed = json.loads(runner.invoke(app, ["schedule", "list", *host, "-o", "json"]).stdout)
    assert [(r["name"], r["cron"]) for r in listed] == [("medical-diagnosis", "0 0 5 * * *")]
    paused = runner.invoke(app, ["schedule", "medical_diagnosis", "--pause", *host])
    assert paused.exit_code == 0 and f"Paused recurring run {listed[0]['id']} (medical-diagnosis)" in paused.stdout
    assert json.loads(runner.invoke(app, ["schedule", "list", *host, "-o", "json"]).stdout)[0]["status"] == "DISABLED"
    assert runner.invoke(app, ["schedule", "medical_diagnosis", "--resume", *host]).exit_code == 0
    assert json.loads(runner.invoke(app, ["schedule", "list", *host, "-o", "json"]).stdout)[0]["status"] == "ENABLED"
    both = runner.invoke(app, ["schedule", "medical_diagnosis", "--pause", "--delete", *host])
    assert both.exit_code == 1 and "--delete and --pause: choose one" in str(both.exception)
    deleted = runner.invoke(app, ["schedule", "medical_diagnosis", "--delete", *host])
    assert deleted.exit_code == 0 and f"Deleted recurring run {listed[0]['id']} (medical-diagnosis)" in deleted.stdout
    assert kfp.recurring == []
    missing = runner.invoke(app, ["schedule", "medical_diagnosis", *host])
    assert missing.exit_code == 1 and "needs --cron" in str(missing.exception)


def run_as_kfp_returns_it(state: str, steps: dict[str, tuple[str, str]], error: str = "") -> Any:
    """A V2beta1Run as kfp.Client.get_run returns it: the run's state, and each step's state and error."""
    from kfp_server_api import GoogleRpcStatus, V2beta1PipelineTaskDetail, V2beta1Run, V2beta1RunDetails

    tasks = [V2beta1PipelineTaskDetail(display_name="root", state=state)] + [
        V2beta1PipelineTaskDetail(display_name=name, state=step_state, pod_name=f"{name}-pod-1" if message else None,
                                  error=GoogleRpcStatus(message=message) if message else None)
        for name, (step_state, message) in steps.items()]
    return V2beta1Run(run_id="r-1", state=state, run_details=V2beta1RunDetails(task_details=tasks),
                      error=GoogleRpcStatus(message=error) if error else None)


class RunningKfp(RecordingKfp):
    """A KFP whose run goes through the given states, one per ``get_run``, then stays in the last."""

    def __init__(self, *runs: Any) -> None:
        super().__init__()
        self.runs = list(runs)

    def get_run(self, run_id: str) -> Any:
        answer = self.runs.pop(0) if len(self.runs) > 1 else self.runs[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


FAILED_RUN = (run_as_kfp_returns_it("RUNNING", {"ingest": ("SUCCEEDED", ""), "validate": ("RUNNING", "")}),
              run_as_kfp_returns_it("RUNNING", {"ingest": ("SUCCEEDED", ""), "validate": ("SUCCEEDED", ""),
                                                "preprocess": ("RUNNING", "")}),
              run_as_kfp_returns_it("FAILED", {"ingest": ("SUCCEEDED", ""), "validate": ("SUCCEEDED", ""),
                                               "preprocess": ("FAILED", "container exited with code 1")},
                                    error="Run failed: 1 task failed"))


def test_waiting_reports_each_step_once_and_names_the_failed_one() -> None:
    lines: list[str] = []
    outcome = submit.wait_for_run(RunningKfp(*FAILED_RUN), "r-1", timeout_s=60, poll_s=0, progress=lines.append)
    assert lines == ["  ingest: succeeded", "  validate: succeeded", "  preprocess: failed"]
    assert outcome.state == "FAILED" and not outcome.succeeded
    assert outcome.failed_steps == {"preprocess": "container exited with code 1; pod preprocess-pod-1: "
                                                  "kubectl logs preprocess-pod-1 -c main"}
    assert outcome.error == "Run failed: 1 task failed"


def test_a_canceled_run_ends_the_wait_and_a_long_one_times_out_saying_it_goes_on() -> None:
    canceled = RunningKfp(run_as_kfp_returns_it("RUNNING", {}), run_as_kfp_returns_it("CANCELED", {}))
    assert submit.wait_for_run(canceled, "r-1", timeout_s=60, poll_s=0, progress=print).state == "CANCELED"
    ticks = iter(range(0, 1000, 30))
    with pytest.raises(ClusterError, match=r"run r-1 is still RUNNING after 100 s \(--timeout\); it goes on"):
        submit.wait_for_run(RunningKfp(run_as_kfp_returns_it("RUNNING", {})), "r-1", timeout_s=100, poll_s=0,
                            progress=print, clock=lambda: float(next(ticks)))


def test_the_wait_rides_out_an_api_blip_but_not_an_outage_or_a_wrong_run() -> None:
    from kfp_server_api import ApiException

    lines: list[str] = []
    blip = RunningKfp(ApiException(status=503, reason="Service Unavailable"), ConnectionResetError("reset"),
                      *FAILED_RUN)
    assert submit.wait_for_run(blip, "r-1", timeout_s=60, poll_s=0, progress=lines.append).state == "FAILED"
    assert lines[:2] == ["  (Kubeflow Pipelines did not answer: HTTP 503 Service Unavailable; asking again)",
                         "  (Kubeflow Pipelines did not answer: ConnectionResetError: reset; asking again)"]
    down = RunningKfp(*[ApiException(status=502, reason="Bad Gateway")] * (submit.MAX_FAILED_POLLS + 1), *FAILED_RUN)
    with pytest.raises(ClusterError, match=r"run r-1: cannot read its state .*HTTP 502 Bad Gateway.*goes on"):
        submit.wait_for_run(down, "r-1", timeout_s=60, poll_s=0, progress=lines.append)
    wrong = RunningKfp(ApiException(status=404, reason="Not Found"), *FAILED_RUN)
    with pytest.raises(ClusterError, match=r"HTTP 404 Not Found"):
        submit.wait_for_run(wrong, "r-1", timeout_s=60, poll_s=0, progress=lines.append)
    retried = [line for line in lines if "did not answer" in line]
    assert len(retried) == 2 + submit.MAX_FAILED_POLLS - 1  # the outage gave up at the limit; the 404 at once


@pytest.mark.parametrize("runs, exit_code", [(FAILED_RUN, 3), ((run_as_kfp_returns_it("SUCCEEDED", {}),), 0)])
def test_keel_submit_wait_exits_by_how_the_run_ended(runs: tuple[Any, ...], exit_code: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    kfp = RunningKfp(*runs)
    monkeypatch.setattr(submit, "client_for", lambda host, token, namespace: kfp)
    monkeypatch.setattr(submit.time, "sleep", lambda seconds: None)
    result = CliRunner().invoke(app, ["submit", "medical_diagnosis", "--host", "http://kfp", "--wait", "-o", "json"])
    assert result.exit_code == exit_code, result.output
    answer = json.loads(result.stdout)  # one JSON document on stdout; the progress goes to stderr
    assert answer["run_id"] == "r-1" and answer["state"] == ("FAILED" if exit_code else "SUCCEEDED")
    assert list(answer["failed_steps"]) == (["preprocess"] if exit_code else [])
    assert "Run r-1 of medical_diagnosis version" in result.stderr
    table = CliRunner().invoke(app, ["submit", "medical_diagnosis", "--host", "http://kfp", "--wait"])
    assert table.exit_code == exit_code and f"Run r-1 of medical_diagnosis {answer['state']} in " in table.stdout
    failed_line = "  preprocess failed: container exited with code 1; pod preprocess-pod-1"
    assert (failed_line in table.stdout) == bool(exit_code)


def test_ctrl_c_on_keel_submit_wait_says_the_run_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """It printed click's "Aborted!" and exited 1, as if the run had failed, without saying where it went on."""
    kfp = RunningKfp(*FAILED_RUN)
    monkeypatch.setattr(submit, "client_for", lambda host, token, namespace: kfp)

    def interrupted(*_: Any, **__: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(submit, "wait_for_run", interrupted)
    result = CliRunner().invoke(app, ["submit", "medical_diagnosis", "--host", "http://kfp", "--wait"])
    assert result.exit_code == 130
    assert "keel: stopped waiting; run r-1 goes on on the cluster: http://kfp/" in result.stderr


class KfpApiRecorder:
    """A Kubeflow Pipelines v2beta1 API in a thread, as far as finding and creating an experiment goes:
    enough for a real kfp.Client to talk to, recording each request's path and body."""

    def __init__(self, multi_user: bool) -> None:
        import http.server
        import threading

        self.requests: list[tuple[str, str, dict[str, Any]]] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, body: dict[str, Any]) -> None:
                payload = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                recorder.requests.append(("GET", self.path, {}))
                self._answer({"multi_user": multi_user} if "healthz" in self.path else {"experiments": []})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                recorder.requests.append(("POST", self.path, body))
                self._answer({**body, "experiment_id": "e-1"})

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.mark.parametrize("multi_user, namespace", [(True, "kubeflow-user-example-com"), (False, "")])
def test_a_chosen_namespace_is_where_kfp_finds_and_creates_the_experiment(multi_user: bool, namespace: str,
                                                                          monkeypatch, tmp_path) -> None:
    """A real kfp.Client from client_for: on a multi-user KFP the profile namespace goes with the lookup and
    the creation of the experiment (and a failed step's pod is looked for there); on a standalone one the
    namespace is left empty."""
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.config/kfp/context.json of the developer's
    api = KfpApiRecorder(multi_user)
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            client = submit.client_for(api.host, namespace=namespace)
        assert [str(w.message) for w in warned] == []  # nothing on stderr for a `keel submit` to a KFP v2
        assert client.create_experiment("keel").experiment_id == "e-1"
    finally:
        api.server.shutdown()
    lookup = next(path for method, path, _ in api.requests if method == "GET" and "/experiments" in path)
    (created,) = [body for method, _, body in api.requests if method == "POST"]
    assert parse_qs(urlparse(lookup).query).get("namespace", [""]) == [namespace]
    assert created.get("namespace", "") == namespace and created["display_name"] == "keel"
    failed = RunningKfp(*FAILED_RUN)
    failed.get_user_namespace = client.get_user_namespace  # type: ignore[method-assign]
    outcome = submit.wait_for_run(failed, "r-1", timeout_s=60, poll_s=0, progress=print)
    where = f"-n {namespace} " if namespace else ""
    assert outcome.failed_steps["preprocess"].endswith(f"kubectl {where}logs preprocess-pod-1 -c main")


def test_keel_submit_and_schedule_take_the_namespace_from_the_flag_or_the_environment(monkeypatch) -> None:
    asked: list[str] = []

    def client_for(host: str, token: str, namespace: str) -> RunningKfp:
        asked.append(namespace)
        return RunningKfp(run_as_kfp_returns_it("SUCCEEDED", {}))

    monkeypatch.setattr(submit, "client_for", client_for)
    monkeypatch.setenv("KEEL_KFP_NAMESPACE", "team-a")
    runner, host = CliRunner(), ["--host", "http://kfp"]
    assert runner.invoke(app, ["submit", "medical_diagnosis", *host]).exit_code == 0
    assert runner.invoke(app, ["submit", "medical_diagnosis", *host, "--namespace", "team-b"]).exit_code == 0
    assert runner.invoke(app, ["schedule", "list", *host, "-n", "team-c"]).exit_code == 1  # no experiment there
    assert asked == ["team-a", "team-b", "team-c"]


# -- the served model on a cluster --------------------------------------------------------------

SERVE_CONFIG = yaml.safe_dump({"http_options": {"host": "0.0.0.0", "port": 8000}, "applications": [
    {"name": "keel", "route_prefix": "/", "import_path": "keel.serve.deployment:application_builder",
     "args": {"model_uri": "models:/m/1", "config": {"replicas": 3, "require_token": True}}}]})


def test_a_rollout_changes_the_model_and_keeps_every_serving_setting() -> None:
    patch = cluster.rayservice_patch({"spec": {"serveConfigV2": SERVE_CONFIG}}, "models:/m/2")
    assert list(patch) == ["spec"] and list(patch["spec"]) == ["serveConfigV2"]
    rolled = yaml.safe_load(patch["spec"]["serveConfigV2"])
    before = yaml.safe_load(SERVE_CONFIG)
    before["applications"][0]["args"]["model_uri"] = "models:/m/2"
    assert rolled == before


def test_a_promotion_by_hand_rolls_only_a_rayservice_serving_the_same_model() -> None:
    """`keel models promote` compares the registered name the RayService serves with the promoted one."""
    from keel.tracking import registered_name

    served = cluster.served_model_uri({"spec": {"serveConfigV2": SERVE_CONFIG}})
    assert served == "models:/m/1" and registered_name(served) == "m"
    assert cluster.served_model_uri({"spec": {"serveConfigV2": yaml.safe_dump({"applications": []})}}) is None
    assert [registered_name(u) for u in ("models:/m@champion", "models:/m-2/10", "runs:/abc/model", None)] == [
        "m", "m-2", None, None]


def test_a_rollout_without_the_keel_app_is_refused() -> None:
    with pytest.raises(ClusterError, match="no 'keel' application"):
        cluster.rolled_serve_config(yaml.safe_dump({"applications": [{"name": "other"}]}), "models:/m/2")


def test_without_a_cluster_the_rollout_and_status_say_what_is_missing(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent-kubeconfig"))
    settings = KeelSettings(home=tmp_path, ray_service="keel-serve", kube_namespace="keel")
    with pytest.raises(ClusterError, match="no Kubernetes configuration"):
        cluster.roll_served_model(settings, "models:/m/2")
    with pytest.raises(ClusterError, match="no Kubernetes configuration"):
        cluster.cluster_status(settings)
    with pytest.raises(ClusterError, match="KEEL_RAY_SERVICE"):
        cluster.roll_served_model(KeelSettings(home=tmp_path, kube_namespace="keel"), "models:/m/2")
    result = CliRunner().invoke(app, ["status"], env={"KEEL_HOME": str(tmp_path), "KEEL_KUBE_NAMESPACE": ""})
    assert result.exit_code == 1 and isinstance(result.exception, ClusterError)
    assert "KEEL_KUBE_NAMESPACE not set" in str(result.exception) and "keel-config" in str(result.exception)


class RayServices:
    """The Kubernetes API's view of one RayService, as `kubernetes.client.CustomObjectsApi` answers for it."""

    def __init__(self) -> None:
        self.service = {"spec": {"serveConfigV2": SERVE_CONFIG}}
        self.patches: list[dict[str, Any]] = []

    def get_namespaced_custom_object(self, *args: Any) -> Any:
        return json.loads(json.dumps(self.service))

    def patch_namespaced_custom_object(self, *args: Any) -> Any:
        self.patches.append(args[-1])
        self.service["spec"].update(args[-1]["spec"])


@pytest.mark.parametrize("starts", [True, False])
def test_a_rollout_waits_for_serve_to_run_the_model_and_puts_the_one_before_back_when_it_fails(
        starts: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deploy step on a cluster took the RayService patch for a deploy: a model whose replicas failed to start
    left the step succeeded, the version champion, and Serve retrying the failed config."""
    from keel.serve import control

    services, waited = RayServices(), []

    def wait_until_running(dashboard: str, timeout_s: float, model_uri: str, app: str) -> dict:
        waited.append((dashboard, model_uri, app))
        if not starts:
            raise control.ServeError("the model server failed to start: MlflowException: no python_function flavor")
        return {}

    monkeypatch.setattr(cluster, "_load_kube_config", lambda: None)
    monkeypatch.setattr("kubernetes.client.CustomObjectsApi", lambda: services)
    monkeypatch.setattr(control, "wait_until_running", wait_until_running)
    settings = KeelSettings(ray_service="keel-serve", kube_namespace="keel")
    if starts:
        assert cluster.roll_served_model(settings, "models:/m/2").startswith("http://keel-serve-serve-svc.keel.")
        assert cluster.served_model_uri(services.service) == "models:/m/2" and len(services.patches) == 1
    else:
        with pytest.raises(control.ServeError, match=r"no python_function flavor\. RayService keel-serve's Serve "
                                                     r"config is back as it was, serving models:/m/1\.$"):
            cluster.roll_served_model(settings, "models:/m/2")
        assert len(services.patches) == 2 and services.service["spec"]["serveConfigV2"] == SERVE_CONFIG
    assert waited == [("http://keel-serve-head-svc.keel.svc.cluster.local:8265", "models:/m/2", "keel")]


def test_a_challenger_that_fails_to_start_beside_the_champion_leaves_the_rayservice_as_it_was(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from keel.serve import control

    services, waited = RayServices(), []

    def wait_until_running(dashboard: str, timeout_s: float, model_uri: str, app: str) -> dict:
        waited.append((model_uri, app))
        raise control.ServeError("the canary model server failed to start: MlflowException: no python_function")

    monkeypatch.setattr(cluster, "_load_kube_config", lambda: None)
    monkeypatch.setattr("kubernetes.client.CustomObjectsApi", lambda: services)
    monkeypatch.setattr(control, "wait_until_running", wait_until_running)
    settings = KeelSettings(ray_service="keel-serve", kube_namespace="keel")
    with pytest.raises(control.ServeError, match=r"Serve config is back as it was, serving models:/m/1\.$"):
        cluster.preview_served_model(settings, "models:/m/3", lambda applications: [
            *applications, {"name": "keel-canary", "args": {"model_uri": "models:/m/3"}}], "keel-canary")
    assert waited == [("models:/m/3", "keel-canary")]
    assert len(services.patches) == 2 and services.service["spec"]["serveConfigV2"] == SERVE_CONFIG


@pytest.mark.parametrize("account, says", [
    ("pipeline-runner", "runs as ServiceAccount pipeline-runner (namespace kubeflow), which the chart grants nothing; "
                        "start the run as keel-pipeline-runner"),
    ("keel-pipeline-runner", "is this namespace among the chart's pipelineRunner.namespaces?")])
def test_a_refused_rollout_names_the_account_the_step_ran_as(account: str, says: str, monkeypatch) -> None:
    """A run started from the Kubeflow UI without a Service Account runs as KFP's default account, which may
    not patch the RayService: the deploy step's error says so, and what to do."""
    from kubernetes.client.exceptions import ApiException

    refusal = ApiException(status=403, reason="Forbidden")
    refusal.body = json.dumps({"kind": "Status", "message": f'rayservices.ray.io "keel-serve" is forbidden: User '
                               f'"system:serviceaccount:kubeflow:{account}" cannot get resource "rayservices"'})

    class Refusing:
        def get_namespaced_custom_object(self, *args: Any) -> Any:
            raise refusal

    monkeypatch.setattr(cluster, "_load_kube_config", lambda: None)
    monkeypatch.setattr("kubernetes.client.CustomObjectsApi", Refusing)
    settings = KeelSettings(ray_service="keel-serve", kube_namespace="keel")
    with pytest.raises(ClusterError, match="Kubernetes answered 403 Forbidden") as refused:
        cluster.roll_served_model(settings, "models:/m/2")
    assert says in str(refused.value)


def test_status_summarizes_kuberay_and_workload_objects() -> None:
    rows = cluster.summarize(
        [{"metadata": {"name": "keel-train"}, "status": {"state": "ready", "availableWorkerReplicas": 2,
                                                         "desiredWorkerReplicas": 3}}],
        [{"metadata": {"name": "keel-serve"}, "spec": {"serveConfigV2": SERVE_CONFIG},
          "status": {"conditions": [{"type": "Ready", "status": "True"}]}},
         {"metadata": {"name": "keel-serve-dev"}, "spec": {"serveConfigV2": yaml.safe_dump(
             {"applications": [{"name": "keel", "args": {"model_uri": "models:/m/1"}},
                               {"name": "keel-shadow", "route_prefix": None, "args": {"model_uri": "models:/m/2"}}]})},
          "status": {"serviceStatus": "Running"}}],
        [{"kind": "Deployment", "metadata": {"name": "keel-mlflow"}, "spec": {"replicas": 2},
          "status": {"readyReplicas": 1}},
         {"kind": "StatefulSet", "metadata": {"name": "keel-postgresql"}, "spec": {"replicas": 1},
          "status": {"readyReplicas": 1}}])
    assert rows == [
        {"kind": "RayCluster", "name": "keel-train", "state": "ready", "detail": "workers 2/3"},
        {"kind": "RayService", "name": "keel-serve", "state": "Ready=True", "detail": "serving models:/m/1"},
        {"kind": "RayService", "name": "keel-serve-dev", "state": "Running",
         "detail": "serving models:/m/1, shadow models:/m/2"},
        {"kind": "Deployment", "name": "keel-mlflow", "state": "NotReady", "detail": "replicas 1/2"},
        {"kind": "StatefulSet", "name": "keel-postgresql", "state": "Ready", "detail": "replicas 1/1"}]


# -- Ray jobs -----------------------------------------------------------------------------------

def test_only_http_addresses_go_through_job_submission() -> None:
    assert jobs.is_job_address("http://keel-train-head-svc:8265") and jobs.is_job_address("https://ray.example")
    assert not jobs.is_job_address("ray://head:10001") and not jobs.is_job_address("auto")
    assert not jobs.is_job_address("")


def test_jobs_get_settings_but_never_secrets(tmp_path) -> None:
    settings = KeelSettings(home=tmp_path, s3_endpoint="http://minio:9000", s3_access_key="AKIAEXAMPLE",
                            s3_secret_key="very-secret", serve_token="tok", ray_address="http://head:8265",
                            artifact_root="s3://keel/artifacts")
    environment = jobs.forwarded_environment(settings)
    assert environment["KEEL_S3_ENDPOINT"] == "http://minio:9000"
    assert environment["KEEL_ARTIFACT_ROOT"] == "s3://keel/artifacts"
    assert "KEEL_RAY_ADDRESS" not in environment and "KEEL_HOME" not in environment
    assert not {v for v in environment.values()} & {"AKIAEXAMPLE", "very-secret", "tok"}


def test_the_job_entrypoint_carries_its_arguments_intact() -> None:
    arguments = {"splits_uri": "s3://b/runs/it's here", "config": {"hidden_sizes": [64, 32]}}
    command = shlex.split(jobs.entrypoint("train", arguments))
    assert command[:4] == ["python", "-m", "keel.jobs", "train"] and json.loads(command[4]) == arguments


def test_an_unknown_stage_is_refused() -> None:
    with pytest.raises(Exception, match="not a Ray stage"):
        jobs.run_stage("evaluate", {}, KeelSettings())


class _HeadStartingUp:
    """A Job Submission client whose head answers 'no agent yet' a few times (what a fresh head does)."""

    def __init__(self, refusals: int, error: str = jobs.AGENT_NOT_READY) -> None:
        self.refusals, self.error, self.calls = refusals, error, 0

    def submit_job(self, **_: object) -> str:
        self.calls += 1
        if self.calls <= self.refusals:
            raise RuntimeError(f"Request failed with status code 500: {self.error}, please try again later..")
        return "raysubmit_1"


def test_submission_waits_for_a_starting_heads_job_agent_but_not_for_other_errors(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs.time, "sleep", lambda _: None)
    settings = KeelSettings(ray_address="http://head:8265")
    starting = _HeadStartingUp(refusals=2)
    assert jobs._submit(starting, "train", {}, settings) == "raysubmit_1" and starting.calls == 3
    broken = _HeadStartingUp(refusals=5, error="entrypoint rejected")
    with pytest.raises(RuntimeError, match="entrypoint rejected"):
        jobs._submit(broken, "train", {}, settings)
    assert broken.calls == 1
