"""End to end on a real cluster: `make e2e-cluster` (opt-in; needs KubeRay and Kubeflow Pipelines installed).

Set KEEL_E2E_KUBECONFIG to a kubeconfig (kind or any cluster) and KEEL_E2E_KFP_HOST
to the KFP API (a port-forward works). The test installs the chart with the dev
values into a fresh namespace (its runner ServiceAccount and config also into the namespace KFP runs steps
in, KEEL_E2E_STEP_NAMESPACE, `kubeflow` by default), creates the credentials Secret in both, waits for the
pods, runs `helm test`, submits medical_diagnosis with serving, and waits for
the run to succeed and the RayService to serve the new champion (steps on
KEEL_IMAGE when set: a build the cluster can pull). It removes the namespace
afterwards.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.deploy import render

pytestmark = pytest.mark.cluster
KUBECONFIG = os.environ.get("KEEL_E2E_KUBECONFIG", "")
KFP_HOST = os.environ.get("KEEL_E2E_KFP_HOST", "")
if not KUBECONFIG:
    pytest.skip("no cluster: set KEEL_E2E_KUBECONFIG (and KEEL_E2E_KFP_HOST) to run `make e2e-cluster`",
                allow_module_level=True)


def kube(*command: str, timeout: int = 600) -> str:
    environment = {**os.environ, "KUBECONFIG": KUBECONFIG}
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stderr or result.stdout}"
    return result.stdout


STEP_NAMESPACE = os.environ.get("KEEL_E2E_STEP_NAMESPACE", "kubeflow")  # where KFP runs steps: standalone KFP's


@pytest.fixture(scope="module")
def release() -> Iterator[str]:
    """The chart in a fresh namespace, named after it so that its objects in the shared step namespace (the
    config's copy, the runner ServiceAccount, the credentials Secret) clash with no other install's."""
    namespace = f"keel-e2e-{uuid.uuid4().hex[:6]}"
    kubectl, helm = render.tool("kubectl"), render.tool("helm")
    kube(kubectl, "create", "namespace", namespace)
    credentials = {key: secrets.token_urlsafe(24) for key in
                   ("s3-access-key", "s3-secret-key", "postgres-password", "serve-token", "ray-auth-token")}
    secret = f"{namespace}-credentials"
    for where in (namespace, STEP_NAMESPACE):
        kube(kubectl, "-n", where, "create", "secret", "generic", secret,
             *(f"--from-literal={k}={v}" for k, v in credentials.items()))
    try:
        kube(helm, "install", "keel", str(render.CHART), "-n", namespace,
             "-f", str(render.CHART / "ci" / "dev-values.yaml"), "--set", f"fullnameOverride={namespace}",
             "--set", f"credentials.existingSecret={secret}",
             "--set", f"pipelineRunner.namespaces={{{STEP_NAMESPACE}}}",
             "--wait", "--timeout", "15m", timeout=1000)
        yield namespace
    finally:
        subprocess.run([helm, "uninstall", "keel", "-n", namespace, "--wait"], capture_output=True, timeout=600,
                       env={**os.environ, "KUBECONFIG": KUBECONFIG}, check=False)  # its step-namespace objects too
        kube(kubectl, "-n", STEP_NAMESPACE, "delete", "secret", secret, "--ignore-not-found")
        kube(kubectl, "delete", "namespace", namespace, "--wait=false")


def test_helm_test_reaches_mlflow_and_the_ray_head(release: str) -> None:
    output = kube(render.tool("helm"), "test", "keel", "-n", release, "--logs", timeout=600)
    assert "mlflow:" in output and "answered 200" in output


def test_a_submitted_pipeline_trains_on_the_ray_cluster_and_rolls_the_served_model(release: str) -> None:
    if not KFP_HOST:
        pytest.skip("no Kubeflow Pipelines: set KEEL_E2E_KFP_HOST to the KFP API of the cluster")
    import kfp

    from keel import submit
    from keel.settings import load_settings

    client = submit.client_for(KFP_HOST)
    params = {"serve": True, "config_map": f"{release}-config", "credentials_secret": f"{release}-credentials"}
    result = submit.submit(client, "medical_diagnosis", KFP_HOST, f"e2e-{release}", params,
                           commit=os.environ.get("KEEL_GIT_COMMIT", "e2e"),
                           service_account=f"{release}-pipeline-runner", image=load_settings().image)
    finished = submit.wait_for_run(client, result.run_id, timeout_s=3600, progress=print)
    assert finished.succeeded, finished
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        status = kube(render.tool("kubectl"), "-n", release, "get", "rayservice", f"{release}-serve",
                      "-o", "jsonpath={.spec.serveConfigV2}")
        if "models:/medical-diagnosis/" in status:
            return
        time.sleep(10)
    pytest.fail(f"the RayService never served a registered version: {status}; KFP {kfp.__version__}")
