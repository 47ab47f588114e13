"""`keel serve` through Ray Serve's REST API on a real `ray start --head` (what a KubeRay head exposes)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray

from keel import storage
from keel.registry import register
from keel.serve import control
from keel.settings import load_settings
from tests.conftest import small_frame
from tests.integration.conftest import free_port, private_head_ports, wait_for_port
from tests.stages import run_stages, small_config, write_small_source
from tests.processes import keel, processes_titled

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A registered model and a Ray head with its dashboard on 127.0.0.1."""
    home = tmp_path_factory.mktemp("serve-cli") / ".keel"
    env = {"KEEL_HOME": str(home)}
    patch = pytest.MonkeyPatch()
    patch.setenv("KEEL_HOME", str(home))
    settings = load_settings()
    uris = run_stages(settings, "cli", write_small_source(home.parent))
    register(uris["train"], uris["evaluate"], uris["ingest"], uris["preprocess"], small_config().registry, {},
             "cli", "small", storage.stage_uri(settings, "cli", "register"), settings)
    ports = private_head_ports()
    url = control.start_local_head(settings, ports, haproxy=False)
    try:
        wait_for_port(ports.dashboard, timeout_s=60)
        yield {**env, "KEEL_RAY_DASHBOARD_URL": url}
    finally:
        control.stop_local_head(settings)
        patch.undo()


def test_stopping_the_local_head_leaves_other_ray_instances_alone(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`keel serve stop` ends the head Keel started, not every Ray process (as `ray stop` would): a
    `keel run` training on this machine keeps its private Ray. The head runs Serve's HAProxy ingress with
    replicas that drain for 2 s, not Ray's 30 (keel.serve.config.LOCAL_DRAIN_ENVIRONMENT)."""
    monkeypatch.setenv("KEEL_HOME", str(tmp_path / ".keel"))
    settings = load_settings()
    other = subprocess.Popen([sys.executable, "-c", "import ray, sys; ray.init(address='local', include_dashboard=False,"
                              " log_to_driver=False); print('up', flush=True); sys.stdin.readline();"
                              " print(ray.get(ray.remote(lambda: 'still running').remote()), flush=True)"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert other.stdout is not None and other.stdin is not None
        assert other.stdout.readline().strip() == "up"
        ports = private_head_ports()
        control.start_local_head(settings, ports)
        wait_for_port(ports.dashboard, timeout_s=60)
        group = json.loads((settings.home / "serve" / "ray-head.json").read_text())["process_group"]
        (raylet,) = processes_titled(str(Path(ray.__file__).parent / "core/src/ray/raylet/raylet"),
                                     lambda pid, parents: os.getpgid(pid) == group)
        environment = set(Path(f"/proc/{raylet}/environ").read_bytes().split(b"\0"))  # what its workers inherit
        # serving again (a roll) deploys on this head: a second `ray start --head` started another Ray beside it,
        # recorded in its place, and `keel serve stop` then left this one running
        raylet_path = str(Path(ray.__file__).parent / "core/src/ray/raylet/raylet")
        every_raylet = processes_titled(raylet_path, lambda pid, parents: True)
        assert control.start_local_head(settings, ports) == f"http://127.0.0.1:{ports.dashboard}"
        assert json.loads((settings.home / "serve" / "ray-head.json").read_text())["process_group"] == group
        assert processes_titled(raylet_path, lambda pid, parents: True) == every_raylet
        assert control.stop_local_head(settings) is True
        assert {b"RAY_SERVE_ENABLE_HA_PROXY=1", b"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=2"} <= environment
        with pytest.raises(TimeoutError):
            wait_for_port(ports.dashboard, timeout_s=1)
        assert control.stop_local_head(settings) is False  # nothing recorded any more
        other.stdin.write("go\n")
        other.stdin.flush()
        assert other.stdout.readline().strip() == "still running"
    finally:
        other.kill()
        other.wait(timeout=30)


def test_trainings_private_ray_resolves_its_own_address_not_the_serving_head(ray_head: dict[str, str]) -> None:
    """Ray's state API, which Ray Train's placement-group cleaner calls from inside the cluster, finds "the"
    cluster through RAY_ADDRESS or else the last `ray start` on the machine: here, the serving head. Asked
    there, the cleaner took the training controller for dead and removed the run's placement group (a CI
    failure). Inside Keel's private Ray it must resolve to that Ray."""
    import os

    import ray

    from keel.train.trainer import ray_session

    @ray.remote
    def resolved_address() -> str:
        from ray._private import services

        return str(services.canonicalize_bootstrap_address_or_die(None))

    before = os.environ.get("RAY_ADDRESS")
    with ray_session(load_settings()):
        own = ray.get_runtime_context().gcs_address
        assert ray.get(resolved_address.remote()) == own
    assert os.environ.get("RAY_ADDRESS") == before  # the step's own environment is left as it was


def test_serve_status_and_stop_through_the_rest_api(ray_head: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    started = keel("serve", "models:/small-model@champion", "--port", str(port), cwd=tmp_path, env=ray_head)
    assert started.returncode == 0, started.stderr[-3000:]
    url = f"http://127.0.0.1:{port}"
    assert f"Serving models:/small-model@champion at {url} " in started.stdout
    # the request it prints to try is one the model answers
    curl = shlex.split(started.stdout.split("Try it:\n", 1)[1])
    assert curl[:5] == ["curl", "-s", "-X", "POST", f"{url}/v1/models/small-model:predict"] and curl[7] == "-d"
    tried = httpx.post(curl[4], content=curl[8], headers={"content-type": "application/json"}, timeout=30)
    assert tried.status_code == 200 and len(tried.json()["predictions"]) == 1, tried.text
    records = small_frame(2).drop(columns=["outcome"]).to_dict(orient="records")
    response = httpx.post(f"{url}/v1/models/small-model:predict", json={"records": records}, timeout=30)
    assert response.status_code == 200 and response.headers["x-model-version"] == "1"
    # the replicas at the priority of what started the head, not Ray's nice 15 (settings.LOCAL_RAY_SYSTEM_CONFIG)
    assert {os.getpriority(os.PRIO_PROCESS, pid) for pid in _head_processes("ray::ServeReplica")} == {os.nice(0)}
    status = json.loads(keel("serve", "status", "--output", "json", cwd=tmp_path, env=ray_head).stdout)
    application = status["applications"]["keel"]
    assert application["status"] == "RUNNING"
    assert application["deployed_app_config"]["args"]["model_uri"] == "models:/small-model@champion"
    shown = keel("serve", "status", cwd=tmp_path, env=ray_head).stdout
    assert "keel: RUNNING  models:/small-model@champion\n  model: HEALTHY, replicas: 1 RUNNING (target 1)\n" in shown
    stopped = keel("serve", "stop", cwd=tmp_path, env=ray_head)
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(keel("serve", "status", "--output", "json", cwd=tmp_path, env=ray_head).stdout)[
        "applications"] == {}


def test_unknown_model_fails_with_the_registry_message(ray_head: dict[str, str], tmp_path: Path) -> None:
    result = keel("serve", "models:/nope@champion", "--port", str(free_port()), cwd=tmp_path, env=ray_head)
    assert result.returncode == 1 and "keel: error:" in result.stderr and "nope" in result.stderr
    assert "Traceback" not in result.stderr


def test_pipeline_ends_serving_its_new_champion(ray_head: dict[str, str], tmp_path: Path) -> None:
    """serve=true: the deploy step serves a new champion, leaves a rejected challenger out, and serves a
    version awaiting approval as the champion's canary until a person rejects it; between runs, the CLI puts
    challengers in shadow and as canaries, and promoting one graduates it. Training used a private Ray
    instance although a head is running on this machine."""
    port = free_port()
    env = ray_head  # the CLI and the Ray head share one registry, as in a cluster
    # the demo's tuning, training to convergence and compression are covered by test_pipeline_local
    assert _run_serving("tune: {num_samples: 0}\ntrain: {max_epochs: 5}\ncompress: {methods: [int8]}\n", port,
                        tmp_path, env)["champion"]
    row = {"mean_radius": 14.0}
    response = httpx.post(f"http://127.0.0.1:{port}/v1/models/medical-diagnosis:predict",
                          json={"records": [row]}, timeout=30)
    assert response.status_code == 422 and "Field required" in response.json()["detail"]  # served, schema enforced
    status = json.loads(keel("serve", "status", "--output", "json", cwd=tmp_path, env=env).stdout)
    assert status["applications"]["keel"]["deployed_app_config"]["args"]["model_uri"] == "models:/medical-diagnosis/1"

    # A challenger that fails the gate: registered, not promoted, and the served model stays v1.
    rejected = _run_serving("tune: {num_samples: 0}\ntrain: {max_epochs: 2}\ncompress: {methods: []}\n"
                            "evaluate: {gate: {tolerance: -1.0}}\n", port, tmp_path, env)
    assert rejected["champion"] is False and rejected["promotion"].startswith("gate failed: f1_macro")
    status = json.loads(keel("serve", "status", "--output", "json", cwd=tmp_path, env=env).stdout)
    assert status["applications"]["keel"]["deployed_app_config"]["args"]["model_uri"] == "models:/medical-diagnosis/1"
    listed = json.loads(keel("models", "list", "--output", "json", cwd=tmp_path, env=env).stdout)
    assert {(m["version"], tuple(m["aliases"])) for m in listed if m["name"] == "medical-diagnosis"} == {
        (1, ("champion",)), (2, ("challenger",))}

    # The challenger in shadow: it scores a copy of every row, answers nobody, and is compared with v1.
    shadow = _shadow_the_challenger(port, tmp_path, env)
    assert shadow["rows"] == 60 and 1 <= shadow["compared"] <= 20 and shadow["failed"] == 0
    assert shadow["shadow_version"] == {"2"}
    # Then as a canary (in the shadow's place: two cores fit two replicas): it answers about half the requests,
    # one version per caller.
    answered_by = _canary_the_challenger(port, tmp_path, env)
    assert set(answered_by.values()) == {"1", "2"}

    # A person overrides the gate: v2 becomes champion and the served model rolls to it, on the same port; the
    # canary, serving v2, has graduated and is gone.
    promoted = keel("models", "promote", "medical-diagnosis", "2", "--reason", "accepted by hand", "--output", "json",
                    cwd=tmp_path, env=env)
    assert promoted.returncode == 0, promoted.stderr[-3000:]
    assert json.loads(promoted.stdout) | {"served_at": "?"} == {
        "model_name": "medical-diagnosis", "version": "2", "previous_champion": "1", "changed": True,
        "reason": "accepted by hand", "inputs_change": "", "classes_change": "",
        "served_at": "?"}
    response = httpx.post(f"http://127.0.0.1:{port}/v1/models/medical-diagnosis:predict",
                          json={"records": [row]}, timeout=30)
    assert response.status_code == 422 and response.headers["x-model-version"] == "2"
    applications = json.loads(keel("serve", "status", "--output", "json", cwd=tmp_path, env=env).stdout)[
        "applications"]
    champion_config = applications["keel"]["deployed_app_config"]["args"]["config"]
    assert list(applications) == ["keel"] and champion_config.get("canary") is None  # the canary graduated
    # A rollback without rolling: the registry moves, the served model stays.
    back = keel("models", "promote", "medical-diagnosis", "1", "--reason", "rollback", "--no-roll", cwd=tmp_path,
                env=env)
    assert back.returncode == 0 and "champion v2 -> v1 (rollback)" in back.stdout and "--no-roll" in back.stdout
    status = json.loads(keel("serve", "status", "--output", "json", cwd=tmp_path, env=env).stdout)
    assert status["applications"]["keel"]["deployed_app_config"]["args"]["model_uri"] == "models:/medical-diagnosis/2"

    # approval: manual: a version that passes the gate waits for a person, and the deploy step serves it as
    # the canary of the model being served (v2: registry.preview), which answers the other half.
    waiting = _run_serving("tune: {num_samples: 0}\ntrain: {max_epochs: 5}\ncompress: {methods: []}\n"
                           "registry: {approval: manual, preview: canary, canary_weight: 0.5}\n"
                           "evaluate: {gate: {tolerance: 1.0, slice_tolerance: 1.0}}\n", port, tmp_path, env)
    assert waiting["champion"] is False and waiting["awaiting_approval"] is True
    assert waiting["promotion"].startswith("awaiting approval (approval: manual): gate passed")
    applications = json.loads(keel("serve", "status", "--output", "json", cwd=tmp_path, env=env).stdout)[
        "applications"]
    assert applications["keel-canary"]["deployed_app_config"]["args"]["model_uri"] == "models:/medical-diagnosis/3"
    assert applications["keel"]["deployed_app_config"]["args"]["model_uri"] == "models:/medical-diagnosis/2"
    assert set(_callers_answered_by(port, canary_version="3").values()) == {"2", "3"}
    # A person rejects it: the canary is withdrawn and v2 answers everything again.
    rejected = keel("models", "reject", "medical-diagnosis", "3", "--reason", "disagrees on live rows",
                    "--output", "json", cwd=tmp_path, env=env)
    assert rejected.returncode == 0, rejected.stderr[-3000:]
    assert json.loads(rejected.stdout)["withdrawn_from"].endswith(f":{port}")  # where the champion serves
    applications = json.loads(keel("serve", "status", "--output", "json", cwd=tmp_path, env=env).stdout)[
        "applications"]
    champion_args = applications["keel"]["deployed_app_config"]["args"]
    assert list(applications) == ["keel"] and champion_args["model_uri"] == "models:/medical-diagnosis/2"
    assert champion_args["config"].get("canary") is None
    assert set(_callers_answered_by(port).values()) == {"2"}
    listed = json.loads(keel("models", "list", "--output", "json", cwd=tmp_path, env=env).stdout)
    assert [m["rejected"] for m in listed if m["version"] == 3] == ["disagrees on live rows"]
    keel("serve", "stop", cwd=tmp_path, env=env)


def _head_processes(title: str) -> list[int]:
    """PIDs of the processes titled ``title...`` that the raylet of the head `keel serve` started forked (each
    worker in a process group of its own, its parent in the head's)."""
    group = json.loads((load_settings().home / "serve" / "ray-head.json").read_text())["process_group"]
    return processes_titled(title, lambda pid, parents: os.getpgid(parents[pid]) == group)


def _run_serving(config: str, port: int, tmp_path: Path, env: dict[str, str]) -> dict[str, Any]:
    """`keel run medical_diagnosis --param serve=true` with ``config`` over the pipeline's own; its summary."""
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*.yaml')))}.yaml"
    path.write_text(config)
    result = keel("run", "medical_diagnosis", "--config", str(path), "--param", "serve=true", "--param",
                  f"serve_port={port}", "--output", "json", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(json.loads(result.stdout))


def _shadow_the_challenger(port: int, tmp_path: Path, env: dict[str, str]) -> dict[str, Any]:
    """Serve v1 with v2 in shadow, send 20 requests of 3 rows, and read what v1's replica counted."""
    served = keel("serve", "models:/medical-diagnosis/1", "--port", str(port), "--host", "0.0.0.0", "--shadow",
                  "models:/medical-diagnosis@challenger", "--output", "json", cwd=tmp_path, env=env)
    assert served.returncode == 0, served.stderr[-3000:]
    assert json.loads(served.stdout)["shadow_model_uri"] == "models:/medical-diagnosis@challenger"
    status = json.loads(keel("serve", "status", "--output", "json", cwd=tmp_path, env=env).stdout)
    assert status["applications"]["keel-shadow"]["deployed_app_config"]["route_prefix"] is None  # no HTTP route
    return _copies_compared(port, 60, served_version="1")


def _canary_the_challenger(port: int, tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    """Serve v1 with v2 as its canary (half the requests); which version answered each of 20 callers."""
    served = keel("serve", "models:/medical-diagnosis/1", "--port", str(port), "--host", "0.0.0.0", "--canary",
                  "models:/medical-diagnosis@challenger", "--canary-weight", "0.5", "--output", "json",
                  cwd=tmp_path, env=env)
    assert served.returncode == 0, served.stderr[-3000:]
    assert json.loads(served.stdout)["canary_model_uri"] == "models:/medical-diagnosis@challenger"
    status = json.loads(keel("serve", "status", "--output", "json", cwd=tmp_path, env=env).stdout)
    assert sorted(status["applications"]) == ["keel", "keel-canary"]  # the shadow is gone
    assert ("keel-canary: RUNNING  models:/medical-diagnosis@challenger  (canary: answers 50% of the requests)"
            in keel("serve", "status", cwd=tmp_path, env=env).stdout)
    assert status["applications"]["keel-canary"]["deployed_app_config"]["route_prefix"] is None
    return _callers_answered_by(port, canary_version="2")


def _callers_answered_by(port: int, canary_version: str | None = None) -> dict[str, str]:
    """Which version answered each of 20 callers (by x-routing-key), checked to be the same on a second
    request, and, with a canary, to match what the champion's replica counted of the requests routed to it."""
    row = _records(1)[0]

    def answered_by(caller: str) -> str:
        response = httpx.post(f"http://127.0.0.1:{port}/v1/models/medical-diagnosis:predict",
                              json={"records": [row]}, headers={"x-routing-key": caller}, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["model_version"] == response.headers["x-model-version"]
        return str(response.headers["x-model-version"])

    versions = {f"user-{i}": answered_by(f"user-{i}") for i in range(20)}
    assert versions == {caller: answered_by(caller) for caller in versions}
    if canary_version is not None:
        lines = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines()
        answered = sum(float(line.split()[-1]) for line in lines
                       if line.startswith("keel_canary_requests_total{") and 'outcome="answered"' in line)
        assert answered == 2 * list(versions.values()).count(canary_version)
    return versions


def _records(rows: int) -> list[dict[str, Any]]:
    from keel.data.builtin import BUILTIN_DATASETS

    return list(BUILTIN_DATASETS["breast_cancer"]().drop(columns=["diagnosis"]).head(rows).to_dict(orient="records"))


def _copies_compared(port: int, rows: int, served_version: str | None = None) -> dict[str, Any]:
    """Send ``rows`` rows, 3 a request; then what the serving replica counted of its copies to the shadow."""
    records = _records(rows)
    for start in range(0, rows, 3):
        response = httpx.post(f"http://127.0.0.1:{port}/v1/models/medical-diagnosis:predict",
                              json={"records": records[start:start + 3]}, timeout=30)
        assert response.status_code == 200, response.text
        assert served_version in (None, response.headers["x-model-version"])
    deadline, counted = time.monotonic() + 60, {}
    while time.monotonic() < deadline:  # copies are compared after the answers went out
        lines = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines()
        counted = {
            "compared": sum(float(line.split()[-1]) for line in lines
                            if line.startswith("keel_shadow_copies_total{") and 'outcome="compared"' in line),
            "failed": sum(float(line.split()[-1]) for line in lines
                          if line.startswith("keel_shadow_copies_total{") and 'outcome="failed"' in line),
            "rows": sum(float(line.split()[-1]) for line in lines if line.startswith("keel_shadow_rows_total{")),
            "shadow_version": {line.split('shadow_version="')[1].split('"')[0] for line in lines
                               if line.startswith("keel_shadow_rows_total{")}}
        if counted["rows"] >= rows or counted["failed"]:
            break
        time.sleep(1)
    return counted


def test_a_champion_whose_replicas_fail_to_start_leaves_the_one_before_serving_and_champion(
        ray_head: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deploy step rolls the served model to a new champion whose model cannot load. Serve kept the old
    replicas answering, but targeted the failed config, and the registry named the new version champion."""
    from keel import tracking
    from keel.registry import promote

    port = free_port()
    served = keel("serve", "models:/small-model/1", "--port", str(port), cwd=tmp_path, env=ray_head)
    assert served.returncode == 0, served.stderr[-3000:]
    monkeypatch.setenv("KEEL_RAY_DASHBOARD_URL", ray_head["KEEL_RAY_DASHBOARD_URL"])
    settings = load_settings()
    client = tracking.mlflow_client(settings)
    unloadable = tmp_path / "unloadable"
    unloadable.mkdir()
    (unloadable / "MLmodel").write_text("flavors: {}\n")  # no python_function flavour: pyfunc cannot load it
    version = str(client.create_model_version("small-model", source=str(unloadable)).version)
    promote(client, small_config().registry, version,
            {"champion_version": "1", "passed": True, "failures": [], "reasons": ["f1_macro better"]})

    failed_to_load = (r"^the model server failed to start: mlflow.exceptions.MlflowException: Model does not have "
                      r"the \"python_function\" flavor \(`keel serve status` shows Serve's whole message\)\. ")
    with pytest.raises(control.ServeError, match=failed_to_load + rf"Champion is back at v1, which serves as before; "
                                                                  rf"v{version} stays challenger"):
        control.deploy_champion(f"models:/small-model/{version}", port, settings)
    assert tracking.champion_version(client, "small-model") == "1"
    application = json.loads(keel("serve", "status", "--output", "json", cwd=tmp_path, env=ray_head).stdout)[
        "applications"]["keel"]
    assert application["status"] == "RUNNING"
    assert application["deployed_app_config"]["args"]["model_uri"] == "models:/small-model/1"
    records = small_frame(2).drop(columns=["outcome"]).to_dict(orient="records")
    response = httpx.post(f"http://127.0.0.1:{port}/v1/models/small-model:predict", json={"records": records},
                          timeout=30)
    assert response.status_code == 200 and response.headers["x-model-version"] == "1"
    assert keel("serve", "stop", cwd=tmp_path, env=ray_head).returncode == 0
