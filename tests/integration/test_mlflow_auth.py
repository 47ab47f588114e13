"""MLflow's basic-auth app as the chart runs it (mlflow.auth.enabled): 401 without credentials.

The auth config file is written by the chart's own init-container script
(rendered from helm/keel with the prod values), then a real `mlflow server
--app-name basic-auth` serves on 127.0.0.1.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy import render
from tests.integration.conftest import free_port, wait_for_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PASSWORD = "keel-admin-password-3c9d"


def chart_init_script() -> str:
    rendered = render.documents(render.helm_template(render.CHART / "ci" / "prod-values.yaml"))
    (mlflow,) = [d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"] == "keel-mlflow"]
    (init,) = [c for c in mlflow["spec"]["template"]["spec"]["initContainers"] if c["name"] == "auth-config"]
    assert init["command"] == ["/bin/sh", "-ec"]
    return init["args"][0]


@pytest.fixture(scope="module")
def mlflow_with_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("mlflow-auth")
    auth = directory / "auth"
    auth.mkdir()
    database = f"sqlite:///{directory / 'mlflow.db'}"
    script = chart_init_script().replace("/auth/", f"{auth}/")
    subprocess.run(["/bin/sh", "-ec", script], check=True, env={
        **os.environ, "BACKEND_STORE_URI": f"sqlite:///{directory / 'auth.db'}", "ADMIN_USERNAME": "admin",
        "ADMIN_PASSWORD": PASSWORD})
    port = free_port()
    log = (directory / "server.log").open("w")
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
         "--port", str(port), "--backend-store-uri", database, "--workers", "1"],
        env={**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(auth / "basic_auth.ini"),
             "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-flask-key"}, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout_s=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def get(url: str, user: str = "", password: str = "") -> int:
    headers = {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()} if user else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_mlflow_refuses_requests_without_valid_credentials(mlflow_with_auth: str) -> None:
    search = f"{mlflow_with_auth}/api/2.0/mlflow/experiments/search?max_results=5"
    assert get(search) == 401
    assert get(search, "admin", "wrong-password") == 401
    assert get(search, "admin", PASSWORD) == 200


def test_keel_logs_in_with_the_chart_variables(mlflow_with_auth: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from keel import tracking
    from keel.settings import KeelSettings

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")  # the ConfigMap's key
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)  # from the credentials Secret
    client = tracking.mlflow_client(KeelSettings(home=tmp_path, mlflow_tracking_uri=mlflow_with_auth))
    experiment_id = client.create_experiment("keel-auth-check")
    assert client.get_experiment(experiment_id).name == "keel-auth-check"
