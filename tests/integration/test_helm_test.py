"""The chart's `helm test` check, run here as its pod would run it: the script is taken from the rendered
chart, the endpoints are real servers on loopback, and the Secret is a directory of files as the kubelet
mounts it. What a platform engineer learns from it: a namespace that cannot reach MLflow, the artifact
store, the Ray head or the Pushgateway, or that lacks the credentials Secret the steps read there, fails,
naming which."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import render
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def check_pods() -> dict[str, dict[str, Any]]:
    """The test pods by namespace: the release's, and one per namespace KFP runs steps in."""
    text = render.run(render.tool("helm"), "template", render.RELEASE, str(render.CHART), "--namespace",
                      render.NAMESPACE, "--show-only", "templates/tests/test-endpoints.yaml")
    return {d["metadata"]["namespace"]: d for d in yaml.safe_load_all(text) if d}


def run_check(pod: dict[str, Any], secret_dir: Path, endpoints: dict[str, str]) -> subprocess.CompletedProcess:
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]} | endpoints
    env |= {"CREDENTIALS_DIR": str(secret_dir), "RAY_AUTH_TOKEN_PATH": str(secret_dir / "ray-auth-token")}
    return subprocess.run([sys.executable, "-c", container["args"][0]], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_every_step_namespace_is_checked_as_the_runner_the_steps_run_as(check_pods: dict[str, Any]) -> None:
    assert sorted(check_pods) == ["keel", "kubeflow"]
    assert check_pods["kubeflow"]["spec"]["serviceAccountName"] == "keel-pipeline-runner"
    assert check_pods["kubeflow"]["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"  # ends
    (container,) = check_pods["kubeflow"]["spec"]["containers"]
    assert container["envFrom"] == [{"configMapRef": {"name": "keel-config"}}]  # the copy in that namespace


def test_the_check_passes_when_everything_answers_and_the_secret_is_there(check_pods, s3_endpoint: str,
                                                                          pushgateway: str, tmp_path: Path) -> None:
    for key in ("s3-access-key", "s3-secret-key", "ray-auth-token"):
        (tmp_path / key).write_text("x")
    # an answer of any kind below 500 proves the network lets the namespace in (moto says 404 to these paths)
    endpoints = {"KEEL_MLFLOW_TRACKING_URI": s3_endpoint, "KEEL_S3_ENDPOINT": s3_endpoint,
                 "KEEL_RAY_ADDRESS": s3_endpoint, "KEEL_PUSHGATEWAY_URL": pushgateway}  # host:port, as steps get it
    result = run_check(check_pods["kubeflow"], tmp_path, endpoints)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("namespace kubeflow: ") == 4 and "artifact store" in result.stdout
    assert f"namespace kubeflow: pushgateway: http://{pushgateway}/-/ready answered 200" in result.stdout


def test_a_missing_secret_key_and_an_unreachable_endpoint_fail_naming_them(check_pods, s3_endpoint: str,
                                                                           tmp_path: Path) -> None:
    (tmp_path / "s3-access-key").write_text("x")  # the rest of the Secret is missing in this namespace
    closed = f"http://127.0.0.1:{free_port()}"
    endpoints = {"KEEL_MLFLOW_TRACKING_URI": s3_endpoint, "KEEL_S3_ENDPOINT": s3_endpoint, "KEEL_RAY_ADDRESS": closed,
                 "KEEL_PUSHGATEWAY_URL": closed.removeprefix("http://")}
    result = run_check(check_pods["kubeflow"], tmp_path, endpoints)
    assert result.returncode == 1
    assert "namespace kubeflow: the Secret keel-credentials is missing or lacks s3-secret-key, ray-auth-token" \
        in result.stderr
    assert f"namespace kubeflow: ray head: {closed}/api/version did not answer" in result.stderr
    assert f"namespace kubeflow: pushgateway: {closed}/-/ready did not answer" in result.stderr
    assert "namespace kubeflow: mlflow: " in result.stdout  # what answered is still reported
