"""MLflow as the chart runs it: PostgreSQL backend store, artifacts proxied to S3, the basic-auth app.

The MLflow pod is rendered from helm/keel with three replicas and auth on, pointed at a real PostgreSQL and
a real S3 API (moto) on 127.0.0.1 through the chart's own `postgresql.external` and `minio.externalEndpoint`
values. Each container's command and environment run here as the pod would run them, Secret values filled
in by name; only the server's `--host` moves to loopback.
"""

from __future__ import annotations

import base64
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from tests.deploy import render
from tests.integration.conftest import S3_SECRET, free_port, s3_client, wait_for_port
from tests.processes import process_tree

pytestmark = [pytest.mark.integration, pytest.mark.slow]

POSTGRES_PASSWORD = "keel-test-postgres-password-41f7"
ADMIN_PASSWORD = "keel-admin-password-3c9d"
REPLICAS = 3
METRICS_VOLUME = "/var/run/mlflow-metrics"  # the emptyDir the server and its metrics container share
SECRET_VALUES = {  # by the env variable the chart fills from the credentials Secret
    "PGPASSWORD": POSTGRES_PASSWORD, "ADMIN_PASSWORD": ADMIN_PASSWORD, "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": S3_SECRET, "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-flask-key"}


def postgres_binary(name: str) -> str:
    """A program from Debian's PostgreSQL package (its newest major version), which puts none on PATH."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        pytest.fail("PostgreSQL is missing: `make test` installs it from Debian (see Makefile system-deps)")
    return found[-1]


def as_server_owner(*command: str) -> list[str]:
    """initdb and the server refuse to run as root: as root, run them as the package's `postgres` user."""
    return (["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []) + list(command)


@pytest.fixture(scope="module")
def postgres_port() -> Iterator[int]:
    """A PostgreSQL server on 127.0.0.1 with password (SCRAM) logins, as a cluster's would take them."""
    directory = Path(tempfile.mkdtemp(prefix="keel-postgres-"))  # not under pytest's root-only tmp dir
    (directory / "password").write_text(POSTGRES_PASSWORD)
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres")
        shutil.chown(directory / "password", "postgres")
    port, data = free_port(), directory / "data"
    subprocess.run(as_server_owner(postgres_binary("initdb"), "-D", str(data), "-U", "keel", "--auth=scram-sha-256",
                                   f"--pwfile={directory / 'password'}", "-E", "UTF8", "--no-sync"),
                   check=True, capture_output=True, timeout=120)
    pg_ctl = as_server_owner(postgres_binary("pg_ctl"), "-D", str(data))
    options = f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*pg_ctl, "-o", options, "-l", str(directory / "log"), "-w", "start"], check=True,
                   capture_output=True, timeout=120)
    try:
        yield port
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], check=False, capture_output=True, timeout=60)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_pod(postgres_port: int, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The chart's MLflow pod spec, for a fresh database `mlflow` and a fresh bucket, with the smallest memory
    limit the chart ships (its dev values)."""
    bucket = f"keel-mlflow-{os.getpid()}"
    s3_client(s3_endpoint).make_bucket(bucket)
    subprocess.run([postgres_binary("createdb"), "-h", "127.0.0.1", "-p", str(postgres_port), "-U", "keel",
                    "mlflow"], check=True, env={**os.environ, "PGPASSWORD": POSTGRES_PASSWORD}, timeout=60)
    port = free_port()
    tightest = yaml.safe_load((render.CHART / "ci" / "dev-values.yaml").read_text())["mlflow"]["resources"]
    values = {"postgresql": {"enabled": False, "external": {"host": "127.0.0.1", "port": postgres_port}},
              "minio": {"enabled": False, "externalEndpoint": s3_endpoint, "bucket": bucket},
              "mlflow": {"replicas": REPLICAS, "port": port, "allowedHosts": [f"127.0.0.1:{port}"],
                         "auth": {"enabled": True}, "resources": tightest}}
    values_file = tmp_path_factory.mktemp("values") / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    rendered = render.documents(render.helm_template(values_file, (), "--show-only", "templates/mlflow.yaml"))
    (deployment,) = [d for d in rendered if d["kind"] == "Deployment"]
    assert deployment["spec"]["replicas"] == REPLICAS
    return {**deployment["spec"]["template"]["spec"], "port": port}


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] == name]
    return found


def command_here(spec: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """The container's command with the image's `python` and `mlflow` as this venv's, and its environment."""
    executables = {"python": sys.executable, "mlflow": str(Path(sys.executable).with_name("mlflow"))}
    command = [*spec["command"], *spec.get("args", [])]
    env = {e["name"]: e["value"] if "value" in e else SECRET_VALUES[e["name"]] for e in spec.get("env", [])}
    return [executables.get(command[0], command[0]), *command[1:]], {**os.environ, **env}


def test_a_wrong_password_fails_at_once_naming_the_store(mlflow_pod: dict[str, Any]) -> None:
    """A running PostgreSQL that refuses the login will not change its mind: no five minutes of retries."""
    command, env = command_here(container(mlflow_pod, "upgrade-database"))
    result = subprocess.run(command, env={**env, "PGPASSWORD": "not-the-password"}, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 1 and "waiting for PostgreSQL" not in result.stdout
    assert "cannot reach MLflow's backend store postgresql://keel@127.0.0.1:" in result.stderr
    assert 'password authentication failed for user "keel"' in result.stderr and "PGPASSWORD" in result.stderr


@pytest.fixture(scope="module")
def replica_migrations(mlflow_pod: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> list[tuple[int, str]]:
    """Every replica's upgrade-database init container started at the same moment on the empty store."""
    command, env = command_here(container(mlflow_pod, "upgrade-database"))
    logs = [tmp_path_factory.mktemp("migration") / "log" for _ in range(REPLICAS)]
    processes = []
    for path in logs:
        with path.open("w") as log:
            processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [process.wait(timeout=300) for process in processes]
    return [(code, path.read_text()) for code, path in zip(codes, logs, strict=True)]


def test_replicas_starting_together_migrate_a_fresh_store_one_at_a_time(replica_migrations, mlflow_pod) -> None:
    """Without the lock two of three fail on each other's tables (pg_type's unique index) and restart."""
    assert [code for code, _ in replica_migrations] == [0] * REPLICAS, "\n\n".join(
        log[-3000:] for _, log in replica_migrations)
    import sqlalchemy
    from alembic.script import ScriptDirectory
    from mlflow.server.auth.db.utils import _get_alembic_config
    from mlflow.store.db.utils import _get_latest_schema_revision, _get_schema_version

    (backend,) = [a.split("=", 1)[1] for a in container(mlflow_pod, "mlflow")["command"] if "--backend-store-uri=" in a]
    engine = sqlalchemy.create_engine(backend.replace("keel@", f"keel:{POSTGRES_PASSWORD}@"))
    try:
        assert _get_schema_version(engine) == _get_latest_schema_revision()
        with engine.connect() as connection:
            auth_version = connection.execute(sqlalchemy.text("SELECT version_num FROM alembic_version_auth")).scalar()
        assert auth_version == ScriptDirectory.from_config(_get_alembic_config(backend)).get_current_head()
    finally:
        engine.dispose()


class Server(NamedTuple):
    url: str
    pid: int
    metrics_directory: Path  # where its workers count requests (--expose-prometheus)


@pytest.fixture(scope="module")
def mlflow_server(replica_migrations, mlflow_pod: dict[str, Any], tmp_path_factory) -> Iterator[Server]:
    """One replica: the auth-config init container's script, then the server, on the migrated store."""
    directory = tmp_path_factory.mktemp("mlflow-pod")
    script, env = command_here(container(mlflow_pod, "auth-config"))
    subprocess.run([script[0], script[1], script[2].replace("/auth/", f"{directory}/")], env=env, check=True,
                   timeout=60)
    command, env = command_here(container(mlflow_pod, "mlflow"))
    command = ["--host=127.0.0.1" if arg == "--host=0.0.0.0" else arg for arg in command]
    command = [arg.replace(METRICS_VOLUME, f"{directory}/metrics") for arg in command]  # the pod's shared emptyDir
    env["MLFLOW_AUTH_CONFIG_PATH"] = env["MLFLOW_AUTH_CONFIG_PATH"].replace("/auth/", f"{directory}/")
    log = (directory / "server.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(mlflow_pod["port"], timeout_s=120)
        yield Server(f"http://127.0.0.1:{mlflow_pod['port']}", server.pid, directory / "metrics")
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        assert "out-of-date database schema" not in (directory / "server.log").read_text()


def get(url: str, user: str = "", password: str = "") -> int:
    headers = {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()} if user else {}
    deadline = time.monotonic() + 60
    while True:  # the port opens before every worker has loaded the app
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as e:
            return e.code
        except (ConnectionError, urllib.error.URLError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_mlflow_refuses_requests_without_valid_credentials(mlflow_server: Server) -> None:
    search = f"{mlflow_server.url}/api/2.0/mlflow/experiments/search?max_results=5"
    assert get(search) == 401
    assert get(search, "admin", "wrong-password") == 401
    assert get(search, "admin", ADMIN_PASSWORD) == 200


def test_keel_tracks_and_registers_through_the_chart_server(mlflow_server: Server, mlflow_pod: dict[str, Any],
                                                            s3_endpoint: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A run, its artifact (proxied to the bucket: the client holds no S3 key) and a champion, in PostgreSQL."""
    from keel import tracking
    from keel.settings import KeelSettings

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")  # the ConfigMap's key
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)  # from the credentials Secret
    client = tracking.mlflow_client(KeelSettings(home=tmp_path, mlflow_tracking_uri=mlflow_server.url))
    experiment_id = client.create_experiment("keel-chart-check")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "accuracy", 0.93)
    (tmp_path / "model.json").write_text('{"hidden_sizes": [32, 16]}')
    client.log_artifact(run.info.run_id, str(tmp_path / "model.json"), "model")
    client.create_registered_model("chart-check")
    version = client.create_model_version("chart-check", f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias("chart-check", tracking.CHAMPION, version.version)

    assert client.get_model_version_by_alias("chart-check", tracking.CHAMPION).run_id == run.info.run_id
    assert client.get_run(run.info.run_id).data.metrics == {"accuracy": 0.93}
    bucket = next(a for a in container(mlflow_pod, "mlflow")["command"] if a.startswith("--artifacts-destination="))
    bucket = bucket.split("s3://", 1)[1].split("/", 1)[0]
    stored = s3_client(s3_endpoint).list_objects(bucket, prefix="mlflow/", recursive=True)
    assert [o.object_name for o in stored if o.object_name.endswith("model/model.json")]


QUANTITY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def private_memory_bytes(root: int) -> int:
    """Resident anonymous memory of a process tree: what the pod's cgroup is charged and cannot reclaim (the
    libraries' file pages it can), so what its memory limit has to hold."""
    total = 0
    for pid in process_tree(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:  # ended while we looked
            continue
        total += sum(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("RssAnon:"))
    return total


def test_a_replica_fits_the_smallest_memory_limit_the_chart_ships(mlflow_server: Server, mlflow_pod) -> None:
    """MLflow's defaults (4 workers, and a job runner of 7 more processes for GenAI scorers) held 2.2 GiB: the
    pod was OOM-killed under the default 2Gi limit and dev's 1Gi alike."""
    assert get(f"{mlflow_server.url}/health") == 200
    limit = container(mlflow_pod, "mlflow")["resources"]["limits"]["memory"]
    limit_bytes = int(limit[:-2]) * QUANTITY_UNITS[limit[-2:]]
    used = private_memory_bytes(mlflow_server.pid)
    assert used < limit_bytes, f"the MLflow replica holds {used / 2**20:.0f} MiB, over its limit of {limit}"


def test_prometheus_scrapes_the_servers_requests_from_the_pods_metrics_container(mlflow_server: Server,
                                                                                 mlflow_pod: dict[str, Any],
                                                                                 tmp_path: Path) -> None:
    """The MLflow server exported no metrics. Its workers now count requests into the pod's shared volume, and
    the metrics container serves their sum on a port of its own, without MLflow's credentials: a real
    Prometheus (Debian package) scrapes it and PromQL sees the requests of both workers."""
    import httpx

    from tests.integration.conftest import start_service

    spec = container(mlflow_pod, "metrics")
    assert {"name": "metrics", "mountPath": METRICS_VOLUME, "readOnly": True} in spec["volumeMounts"]
    command, env = command_here(spec)
    metrics_port = free_port()
    command = [arg.replace(METRICS_VOLUME, str(mlflow_server.metrics_directory)) for arg in command
               if not arg.startswith("--port=")] + [f"--port={metrics_port}", "--host=127.0.0.1"]
    exporter = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        f"scrape_configs: [{{job_name: mlflow, static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]}}]\n")
    port = free_port()
    try:
        wait_for_port(metrics_port)
        search = f"{mlflow_server.url}/api/2.0/mlflow/experiments/search?max_results=5"
        for _ in range(2 * 10):  # enough for both workers to answer some
            assert get(search, "admin", ADMIN_PASSWORD) == 200
        prometheus = start_service(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                    f"--web.listen-address=127.0.0.1:{port}"], port, tmp_path)
        try:
            def query(promql: str) -> float:
                result = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": promql},
                                   timeout=10).json()
                values = result["data"]["result"]
                return float(values[0]["value"][1]) if values else 0.0

            answered = 'sum(mlflow_http_request_total{method="GET", status="200"})'
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and query(answered) < 20:
                time.sleep(1)
            assert query(answered) >= 20
            assert query('sum(mlflow_http_request_duration_seconds_count{status="200"})') >= 20
        finally:
            prometheus.terminate()
            prometheus.wait(timeout=10)
    finally:
        exporter.terminate()
        assert exporter.wait(timeout=10) == 0  # SIGTERM, the pod's shutdown, ends it cleanly
