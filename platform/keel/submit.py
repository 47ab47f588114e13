"""Run pipelines on Kubeflow Pipelines: upload a named version, start a run or a recurring run.

A pipeline version is named ``<keel version>-<commit>``, so the KFP UI shows
which code every run used and a resubmission of the same commit reuses its
version. Steps run as the chart's pipeline-runner ServiceAccount and read the
chart's ConfigMap and Secret (see :func:`keel.cluster.attach_cluster_config`).
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keel import __version__
from keel.errors import ClusterError, ConfigError
from keel.images import image_fingerprint, use_runtime_image

HEALTHZ = "/apis/v2beta1/healthz"
DEFAULT_SERVICE_ACCOUNT = "keel-pipeline-runner"
CRON_FIELD = re.compile(r"^[\d*/,\-?LW#A-Za-z]+$")
# Run states after which nothing more happens. kfp.Client.wait_for_run_completion (2.x) leaves CANCELED out of its
# own list and would wait on a canceled run until its timeout.
FINISHED_STATES = ("SUCCEEDED", "FAILED", "CANCELED", "SKIPPED")
MAX_FAILED_POLLS = 6  # in a row, a minute at the default poll: an API restart, not an outage


@dataclass(frozen=True)
class Submission:
    """Where a submitted pipeline lives on KFP."""

    pipeline_id: str
    version_id: str
    version_name: str
    experiment_id: str
    run_id: str
    url: str
    replaced: tuple[str, ...] = ()  # a schedule's earlier recurring runs of the same name, deleted


@dataclass(frozen=True)
class Outcome:
    """How a run ended, for a CI job that started it and waited."""

    state: str  # one of FINISHED_STATES
    seconds: float  # from the start of the wait
    failed_steps: dict[str, str] = field(default_factory=dict)  # step -> its error, as KFP reports it
    error: str = ""  # the run's own error message

    @property
    def succeeded(self) -> bool:
        return self.state == "SUCCEEDED"


def version_name(commit: str, image: str = "") -> str:
    """``<keel version>-<12-char commit>``: unique per commit, readable in the KFP UI; steps on another image
    than Keel's own (``--image``) add its fingerprint, so the same commit built for two registries is two
    versions."""
    short = re.sub(r"[^0-9a-zA-Z]", "", commit)[:12] or "unknown"
    return "-".join(filter(None, (__version__, short, image_fingerprint(image))))


def kfp_cron(expression: str) -> str:
    """KFP schedules take six fields (seconds first); a five-field crontab line gets second 0."""
    fields = expression.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6 or not all(CRON_FIELD.match(f) for f in fields):
        raise ConfigError(f"--cron {expression!r}: expected a crontab expression of 5 fields "
                          "(minute hour day month weekday), e.g. '0 3 * * *' for 03:00 daily.")
    return " ".join(fields)


def refuse_sources_on_this_machine(params: dict[str, Any]) -> None:
    """A ``source``/``*_source`` parameter that is a file here (a relative path, or one that exists on this
    machine): the steps run in the cluster's pods, which would fail to find it after pulling the image, and
    retry twice."""
    for name, value in params.items():
        if not (name == "source" or name.endswith("_source")) or not isinstance(value, str):
            continue
        scheme = urllib.parse.urlparse(value).scheme
        path = value.removeprefix("file://") if scheme == "file" else value if not scheme else ""
        if path and (not path.startswith("/") or Path(path).exists()):
            raise ConfigError(f"--param {name}={value}: a file on this machine, which the steps on the cluster "
                              "cannot read. Copy it to the object store (mc cp, aws s3 cp) and pass its s3:// URI, "
                              "or an http(s):// one.")


def check_reachable(host: str, timeout_s: float = 10) -> None:
    """Fail fast, naming the host, rather than after kfp.Client's own retries."""
    url = host.rstrip("/") + HEALTHZ
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):  # noqa: S310 - the user's own KFP host
            return
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            return  # reachable; kfp.Client brings the credentials
        raise ClusterError(f"Kubeflow Pipelines at {host} answered HTTP {e.code} on {HEALTHZ}; "
                           "is --host the KFP API endpoint (e.g. http://ml-pipeline-ui.kubeflow)?") from e
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ClusterError(f"cannot reach Kubeflow Pipelines at {host} ({getattr(e, 'reason', e)}). Check --host or "
                           "KEEL_KFP_HOST, and port-forward if it is inside the cluster: "
                           "kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80.") from e


def client_for(host: str, token: str = "", namespace: str = "") -> Any:
    """A kfp.Client for ``host``; ``token`` (KEEL_KFP_TOKEN) for a KFP behind authentication.

    ``namespace`` (KEEL_KFP_NAMESPACE) is the profile namespace of a multi-user Kubeflow: its experiments,
    runs and recurring runs live there, and so do the steps' pods. Empty leaves it to kfp, which uses the
    namespace of the pod it runs in (a Kubeflow notebook) on a multi-user KFP, and none on a standalone one.
    """
    import kfp

    check_reachable(host)
    with warnings.catch_warnings():  # kfp.Client's notice on every `keel submit`: that it needs KFP v2, as Keel does
        warnings.filterwarnings("ignore", message="This client only works with Kubeflow Pipeline v2",
                                category=FutureWarning)
        # kfp.Client takes namespace="kubeflow" (its default) to mean "not given", so only a chosen one is passed
        return kfp.Client(host=host, existing_token=token or None, **({"namespace": namespace} if namespace else {}))


def compile_pipeline(built: Any, target: Path, image: str = "") -> Path:
    """KFP IR YAML at ``target``, its steps on ``image`` (empty: Keel's own runtime image)."""
    from kfp import compiler

    compiler.Compiler().compile(built, str(target))
    return use_runtime_image(target, image)


def upload_version(client: Any, package: Path, pipeline_name: str, version: str) -> tuple[str, str]:
    """The pipeline's id and the id of ``version`` (uploaded now, or found from an earlier submission)."""
    pipeline_id = client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(str(package), pipeline_name=pipeline_name).pipeline_id
    listing = client.list_pipeline_versions(pipeline_id, page_size=100)
    for existing in listing.pipeline_versions or []:
        if existing.display_name == version:
            return pipeline_id, existing.pipeline_version_id
    uploaded = client.upload_pipeline_version(str(package), pipeline_version_name=version, pipeline_id=pipeline_id)
    return pipeline_id, uploaded.pipeline_version_id


def submit(client: Any, pipeline: str, host: str, experiment: str, params: dict[str, Any], commit: str,
           config: Path | None = None, cron: str = "", service_account: str = DEFAULT_SERVICE_ACCOUNT,
           schedule_name: str = "", image: str = "") -> Submission:
    """Compile, upload the version, then start a run, or, with ``cron``, schedule it (see :func:`schedule`)."""
    import pipelines

    built = pipelines.build(pipeline, config)
    pipeline_name = built.name
    version = version_name(commit, image)
    with tempfile.TemporaryDirectory(prefix="keel-submit-") as scratch:
        package = compile_pipeline(built, Path(scratch) / f"{pipeline}.yaml", image)
        pipeline_id, version_id = upload_version(client, package, pipeline_name, version)
    experiment_id = client.create_experiment(experiment).experiment_id
    if cron:
        run_id, replaced = schedule(client, experiment_id, schedule_name or pipeline_name, cron, params, pipeline_id,
                                    version_id, service_account, f"{pipeline_name} {version}")
        return Submission(pipeline_id, version_id, version, experiment_id, run_id,
                          host.rstrip("/") + f"/#/recurringrun/details/{run_id}", replaced)
    started = client.run_pipeline(experiment_id, f"{pipeline_name} {version}", params=params,
                                  pipeline_id=pipeline_id, version_id=version_id, service_account=service_account)
    return Submission(pipeline_id, version_id, version, experiment_id, started.run_id,
                      host.rstrip("/") + f"/#/runs/details/{started.run_id}")


def schedule(client: Any, experiment_id: str, name: str, cron: str, params: dict[str, Any], pipeline_id: str,
             version_id: str, service_account: str, description: str) -> tuple[str, tuple[str, ...]]:
    """The recurring run ``name`` in the experiment, on this version: created, then the earlier ones of that
    name deleted. A CI job that schedules on every merge keeps one nightly run, on the newest code, instead of
    adding one per commit; the new run exists before the old goes, so a failure leaves one of them.
    Returns the new recurring run's id and the ids it replaced."""
    started = client.create_recurring_run(experiment_id, name, description=f"{description}, cron {cron}",
                                          cron_expression=kfp_cron(cron), max_concurrency=1, no_catchup=True,
                                          params=params, pipeline_id=pipeline_id, version_id=version_id,
                                          service_account=service_account)
    earlier = tuple(run.recurring_run_id for run in recurring_runs(client, experiment_id)
                    if run.display_name == name and run.recurring_run_id != started.recurring_run_id)
    for recurring_run_id in earlier:
        client.delete_recurring_run(recurring_run_id)
    return started.recurring_run_id, earlier


def recurring_runs(client: Any, experiment_id: str) -> list[Any]:
    """Every recurring run in the experiment, page by page."""
    found: list[Any] = []
    token = ""
    while True:
        page = client.list_recurring_runs(page_token=token, page_size=100, experiment_id=experiment_id)
        found += page.recurring_runs or []
        token = page.next_page_token or ""
        if not token:
            return found


def existing_experiment_id(client: Any, experiment: str) -> str:
    """The id of an experiment that must exist already (listing or deleting creates nothing)."""
    try:
        return str(client.get_experiment(experiment_name=experiment).experiment_id)
    except ValueError as e:
        raise ClusterError(f"no experiment {experiment!r} on Kubeflow Pipelines (--experiment).") from e


def list_schedules(client: Any, experiment: str) -> list[dict[str, str]]:
    """The experiment's recurring runs as `keel schedule list` shows them."""
    return [{"name": str(run.display_name), "id": str(run.recurring_run_id), "status": str(run.status or ""),
             "cron": str(getattr(getattr(run.trigger, "cron_schedule", None), "cron", "") or ""),
             "version_id": str(getattr(run.pipeline_version_reference, "pipeline_version_id", "") or ""),
             "description": str(run.description or "")}
            for run in recurring_runs(client, existing_experiment_id(client, experiment))]


# What `keel schedule --delete|--pause|--resume` does to a recurring run, by kfp.Client method
SCHEDULE_ACTIONS = {"delete": "delete_recurring_run", "pause": "disable_recurring_run",
                    "resume": "enable_recurring_run"}


def change_schedules(client: Any, experiment: str, name: str, action: str) -> list[str]:
    """Delete, pause or resume the experiment's recurring runs named ``name``; returns their ids. A paused
    run keeps its schedule and version and starts nothing until resumed (a nightly retraining held through
    an incident, say)."""
    experiment_id = existing_experiment_id(client, experiment)
    named = [str(run.recurring_run_id) for run in recurring_runs(client, experiment_id) if run.display_name == name]
    if not named:
        raise ClusterError(f"no recurring run named {name!r} in experiment {experiment!r} "
                           f"(`keel schedule list --experiment {experiment}` shows them).")
    for recurring_run_id in named:
        getattr(client, SCHEDULE_ACTIONS[action])(recurring_run_id)
    return named


def wait_for_run(client: Any, run_id: str, timeout_s: float, poll_s: float = 10,
                 progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
                 clock: Callable[[], float] = time.monotonic) -> Outcome:
    """Poll the run until it finishes; each step's end is reported through ``progress`` as it happens.

    A run still going after ``timeout_s`` is a ClusterError that says it goes on: the wait ends, the run
    does not (cancel it in the UI or with ``kfp run terminate`` if that is what the job wants).
    """
    started, reported, failed_polls = clock(), set(), 0
    namespace = str(getattr(client, "get_user_namespace", lambda: "")() or "")
    while True:
        try:
            run = client.get_run(run_id)
            failed_polls = 0
        except Exception as e:  # noqa: BLE001 - kfp_server_api, urllib3 and socket errors alike
            failed_polls += 1
            if failed_polls >= MAX_FAILED_POLLS or not _transient(e):
                raise ClusterError(f"run {run_id}: cannot read its state from Kubeflow Pipelines ({_described(e)}); "
                                   "the run goes on on the cluster, and `keel submit` stopped waiting for it.") from e
            progress(f"  (Kubeflow Pipelines did not answer: {_described(e)}; asking again)")
            time.sleep(poll_s)
            continue
        state = str(run.state or "PENDING").upper()
        for task in _tasks(run):
            step_state = str(task.state or "").upper()
            if step_state in FINISHED_STATES and task.display_name not in reported:
                reported.add(task.display_name)
                progress(f"  {task.display_name}: {step_state.lower()}")
        elapsed = clock() - started
        if state in FINISHED_STATES:
            failed = {str(task.display_name): _failure(task, namespace) for task in _tasks(run)
                      if str(task.state or "").upper() == "FAILED"}
            return Outcome(state, elapsed, failed, _message(run.error))
        if elapsed > timeout_s:
            raise ClusterError(f"run {run_id} is still {state} after {timeout_s:.0f} s (--timeout); it goes on on "
                               f"the cluster, and `keel submit` stopped waiting for it.")
        time.sleep(poll_s)


def _transient(error: Exception) -> bool:
    """A blip worth asking again after: the API's 5xx or 429, or no connection; not a 4xx (a wrong run id or
    credentials), which asking again does not mend."""
    status = getattr(error, "status", None)
    if isinstance(status, int):
        return status >= 500 or status == 429
    return isinstance(error, OSError) or type(error).__module__.startswith("urllib3")


def _described(error: Exception) -> str:
    status = getattr(error, "status", None)
    return f"HTTP {status} {getattr(error, 'reason', '')}".strip() if isinstance(status, int) \
        else f"{type(error).__name__}: {error}"


def _tasks(run: Any) -> list[Any]:
    """The run's steps, without the DAG that holds them all (KFP's ``root``)."""
    details = getattr(run.run_details, "task_details", None) if run.run_details else None
    return [task for task in details or [] if task.display_name and task.display_name != "root"]


def _failure(task: Any, namespace: str) -> str:
    """A failed step's error, and the pod whose log says more (KFP runs the step's code in container ``main``,
    in the run's profile namespace on a multi-user KFP; a standalone KFP's own namespace, unknown here, else)."""
    where = f"-n {namespace} " if namespace else ""
    pod = f"pod {task.pod_name}: kubectl {where}logs {task.pod_name} -c main" if getattr(task, "pod_name", None) else ""
    return "; ".join(part for part in (_message(task.error), pod) if part)


def _message(error: Any) -> str:
    return str(getattr(error, "message", "") or "")
