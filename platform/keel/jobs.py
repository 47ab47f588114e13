"""Run Ray stages (train, tune, batch scoring on Ray) where the Ray cluster is: here, or on a cluster through
Ray Jobs.

When ``KEEL_RAY_ADDRESS`` is an http(s) URL (a KubeRay head's dashboard, as
the chart sets it), :func:`run_stage` submits the stage as a Ray job through
the Job Submission API, streams the job's logs into the component's log, and
raises with the job's own error when it fails. The job's entrypoint is
``python -m keel.jobs STAGE ARGS_JSON``, which calls the same stage function
with Ray connected to the cluster it runs on. The job carries the step's own
``keel`` package (``py_modules``): the Ray cluster's image is the chart's,
upgraded on its own schedule, and a run must train with the code of its
pipeline version. Otherwise the stage runs in this process on a local Ray
(or a ``ray://`` address).

Credentials never travel in the job: the Ray pods read them from the same
Secret. Only non-secret ``KEEL_*`` settings are forwarded, so the job sees the
run's own MLflow experiment and artifact root.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from keel.errors import KeelError, TrainingError
from keel.settings import KeelSettings, load_settings

ENTRYPOINT_MODULE = "keel.jobs"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
LOG_TAIL_CHARS = 4000
# Settings a job must not inherit from the submitting pod: its own Ray connection, and secrets.
NOT_FORWARDED = {"ray_address", "ray_dashboard_url", "home"}


def is_job_address(address: str) -> bool:
    """A Job Submission endpoint (a Ray head's dashboard URL) rather than a ray:// or local address."""
    return address.startswith(("http://", "https://"))


def _stage_function(stage: str) -> Callable[..., Any]:
    if stage == "train":
        from keel.train.trainer import train_stage

        return train_stage
    if stage == "tune":
        from keel.tune import tune_stage

        return tune_stage
    if stage == "recommend_train":
        from keel.recommend.train import train_recommender_stage

        return train_recommender_stage
    if stage == "intent_train":
        from keel.intents.train import train_intents_stage

        return train_intents_stage
    if stage == "predict":
        from keel.batch.distributed import score_on_ray

        return score_on_ray
    raise KeelError(f"{stage!r} is not a Ray stage; expected train, tune, recommend_train, intent_train or predict.")


def forwarded_environment(settings: KeelSettings) -> dict[str, str]:
    """Non-secret KEEL_* settings for the job's runtime_env (SecretStr fields are left out)."""
    from pydantic import SecretStr

    values = settings.model_dump()
    return {f"KEEL_{name.upper()}": str(value) for name, value in values.items()
            if name not in NOT_FORWARDED and not isinstance(value, SecretStr) and value not in ("", None)}


def shipped_code() -> list[str]:
    """The ``keel`` package this process runs, for the job's ``py_modules``: Ray uploads it once per content
    hash and puts it ahead of the image's own copy on every process of the job, Ray Train's workers too.
    Its dependencies still come from the image, which ``requirements.lock`` pins for both."""
    import keel

    return [str(Path(keel.__file__).parent)]


def entrypoint(stage: str, arguments: dict[str, Any]) -> str:
    return f"python -m {ENTRYPOINT_MODULE} {stage} {shlex.quote(json.dumps(arguments, sort_keys=True))}"


def run_stage(stage: str, arguments: dict[str, Any], settings: KeelSettings, timeout_s: float = 6 * 3600) -> Any:
    """Run ``stage`` with JSON-able ``arguments``: as a Ray job on a cluster, else in this process."""
    if not is_job_address(settings.ray_address):
        return _stage_function(stage)(settings=settings, **arguments)
    return submit_and_wait(stage, arguments, settings, timeout_s)


def _client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    from keel.serve.control import ray_auth_headers

    try:
        return JobSubmissionClient(address, headers=ray_auth_headers())
    except (ConnectionError, RuntimeError) as e:
        raise TrainingError(f"cannot reach the Ray Job Submission API at {address} ({e}). Check KEEL_RAY_ADDRESS "
                            "(the Ray head's dashboard URL, e.g. http://keel-train-head-svc:8265) and that the "
                            "RayCluster is ready (`keel status`).") from e


def submit_and_wait(stage: str, arguments: dict[str, Any], settings: KeelSettings, timeout_s: float) -> Any:
    """Submit, stream the logs, and return the stage's result (the job prints it as its last line)."""
    client = _client(settings.ray_address)
    job_id = _submit(client, stage, arguments, settings)
    print(f"Submitted Ray job {job_id} ({stage}) to {settings.ray_address}", flush=True)
    with _stopped_if_the_step_ends_first(client, job_id):
        logs = asyncio.run(_stream_logs(client, job_id, timeout_s))
        status = _wait(client, job_id, timeout_s)
    if status != "SUCCEEDED":
        info = client.get_job_info(job_id)
        raise TrainingError(f"Ray job {job_id} ({stage}) ended {status}: {info.message or ''}\n"
                            f"{logs[-LOG_TAIL_CHARS:]}".rstrip())
    return _result(logs, job_id)


@contextmanager
def _stopped_if_the_step_ends_first(client: Any, job_id: str) -> Iterator[None]:
    """Stop the Ray job when its step ends before it: Kubeflow terminating the run (SIGTERM to the step's pod), an
    evicted pod, Ctrl-C here, a lost connection to the head. The job used to run on without its step: it held
    the cluster's CPUs or GPUs to its end, published into a run that had ended, and a retry of the step trained
    a second copy beside it."""
    from keel.signals import sigterm_raises

    try:
        with sigterm_raises():
            yield
    except BaseException:
        try:
            if client.stop_job(job_id):
                print(f"Stopped Ray job {job_id}: its step ended first.", flush=True)
        except Exception as e:  # the reason the step ended is the one to report
            print(f"Could not stop Ray job {job_id} ({e}); `ray job stop {job_id}` does.", file=sys.stderr,
                  flush=True)
        raise


# A head that has just started (or a KubeRay head pod just rescheduled) answers this 500 until its
# job agent registers; it says to try again, so the step does, for a bounded time.
AGENT_NOT_READY = "No available agent to submit job"
AGENT_WAIT_S = 90.0


def _submit(client: Any, stage: str, arguments: dict[str, Any], settings: KeelSettings) -> str:
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return str(client.submit_job(entrypoint=entrypoint(stage, arguments),
                                         runtime_env={"env_vars": forwarded_environment(settings),
                                                      "py_modules": shipped_code()},
                                         metadata={"keel.stage": stage}))
        except RuntimeError as e:
            if AGENT_NOT_READY not in str(e):
                raise
            if time.monotonic() > deadline:
                raise TrainingError(_no_job_agent(settings.ray_address, stage)) from e
            time.sleep(2.0)


def _no_job_agent(address: str, stage: str) -> str:
    """Ray's own words ("No available agent") name neither the cause nor the fix; a head whose agent died keeps
    answering them for good, and only its log says why."""
    return (f"the Ray head at {address} answered '{AGENT_NOT_READY}' to the {stage} job for {AGENT_WAIT_S:.0f} s: "
            "its dashboard agent, which runs Ray jobs, is not running. Ray says why in the head's "
            "/tmp/ray/session_latest/logs/dashboard_agent.log (often 'address already in use': another process "
            "holds its --dashboard-agent-listen-port, default 52365; or it was killed for memory). Restart the "
            "head: on KubeRay delete the head pod (the operator starts a new one), locally `ray stop` and "
            "`ray start --head` again.")


async def _stream_logs(client: Any, job_id: str, timeout_s: float) -> str:
    collected: list[str] = []

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()
            collected.append(lines)

    try:
        await asyncio.wait_for(follow(), timeout=timeout_s)
    except TimeoutError:
        client.stop_job(job_id)
    return "".join(collected)


def _wait(client: Any, job_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(1)
    client.stop_job(job_id)
    return "TIMED OUT"


RESULT_MARKER = "KEEL-JOB-RESULT "


def _result(logs: str, job_id: str) -> Any:
    for line in reversed(logs.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    raise TrainingError(f"Ray job {job_id} succeeded but printed no result line ({RESULT_MARKER.strip()}).")


def main(argv: list[str]) -> int:
    """The job's entrypoint: run the stage against the Ray cluster the job runs on."""
    import keel

    stage, arguments = argv[0], json.loads(argv[1])
    print(f"keel {keel.__version__} from {Path(keel.__file__).parent}", file=sys.stderr, flush=True)
    settings = load_settings(ray_address="auto")
    try:
        result = _stage_function(stage)(settings=settings, **arguments)
    except KeelError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    print(RESULT_MARKER + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
