"""Reaching the MLflow tracking server and the S3 endpoint: one that does not answer fails in seconds, by name.

MLflow's client retries a refused connection 7 times with backoff, minutes a call: `keel run` against a stopped
server took 8 minutes and ended in a traceback from the step, then another from the CLI itself. Against a
stopped S3 endpoint the step said why, and then the CLI's summary died on MinIO's MaxRetryError.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from keel import storage, tracking
from keel.cli import app
from keel.cli.run import _mark_mlflow_run_ended
from keel.errors import StorageError, TrackingError
from keel.settings import KeelSettings
from tests.integration.conftest import free_port

NOT_ANSWERING = "cannot reach the MLflow tracking server at http://127.0.0.1:{port} ([Errno 111] Connection refused)"


@pytest.fixture
def answering_server() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server that answers every request 404, as a tracking server behind a path might; its paths asked."""
    asked: list[str] = []

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            asked.append(self.path)
            self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", asked
    server.shutdown()
    server.server_close()


def test_a_server_that_does_not_answer_is_named_with_what_to_do() -> None:
    port = free_port()
    with pytest.raises(TrackingError) as raised:
        tracking.check_tracking_server(f"http://127.0.0.1:{port}")
    assert str(raised.value).startswith(NOT_ANSWERING.format(port=port))
    assert "KEEL_MLFLOW_TRACKING_URI" in str(raised.value)
    with pytest.raises(TrackingError, match="Name or service not known|name resolution"):
        tracking.check_tracking_server("http://mlflow.keel.invalid:5000")


def test_any_http_answer_is_left_to_mlflow_and_a_server_is_asked_once(answering_server: tuple[str, list[str]],
                                                                       tmp_path: Path) -> None:
    url, asked = answering_server
    tracking.check_tracking_server(url)
    tracking.check_tracking_server(url)
    assert asked == ["/health"]
    tracking.check_tracking_server(f"sqlite:///{tmp_path / 'mlflow.db'}")  # a local store: nothing to reach
    assert asked == ["/health"]


def test_keel_run_and_the_registry_commands_stop_at_once_without_a_traceback(tmp_path: Path) -> None:
    port = free_port()
    env = {"KEEL_HOME": str(tmp_path / ".keel"), "KEEL_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    for command in (["run", "medical_diagnosis"], ["models", "list"]):
        result = CliRunner().invoke(app, command, env=env)
        assert result.exit_code == 1 and isinstance(result.exception, TrackingError), result.output
        assert str(result.exception).startswith(NOT_ANSWERING.format(port=port))
    assert not (tmp_path / ".keel" / "artifacts").exists()  # no step ran


def test_a_failed_run_is_still_reported_when_mlflow_is_gone_by_the_end(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """Marking the failed run FAILED is best effort: the CLI's own traceback hid why the run failed."""
    settings = KeelSettings(home=tmp_path, mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}")
    _mark_mlflow_run_ended(settings, "medical-diagnosis-20261207-000000-abcdef")
    err = capsys.readouterr().err
    assert err.startswith("keel: warning: could not mark the MLflow run of medical-diagnosis-20261207-000000-abcdef "
                          "FAILED: cannot reach the MLflow tracking server")


def s3_settings(tmp_path: Path, endpoint: str) -> KeelSettings:
    return KeelSettings(home=tmp_path, artifact_root="s3://keel/artifacts", s3_endpoint=endpoint,
                        s3_access_key="a", s3_secret_key="b")


def test_an_s3_endpoint_that_does_not_answer_fails_keel_run_before_any_step(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StorageError) as raised:
        storage.check_s3_endpoint(s3_settings(tmp_path, endpoint))
    assert str(raised.value).startswith(f"cannot reach the S3 endpoint {endpoint} of the artifact root "
                                        "s3://keel/artifacts ([Errno 111] Connection refused)")
    env = {"KEEL_HOME": str(tmp_path / ".keel"), "KEEL_ARTIFACT_ROOT": "s3://keel/artifacts",
           "KEEL_S3_ENDPOINT": endpoint}
    result = CliRunner().invoke(app, ["run", "medical_diagnosis"], env=env)
    assert result.exit_code == 1 and isinstance(result.exception, StorageError), result.output
    assert not (tmp_path / ".keel" / "logs").exists()  # no run started


def test_only_an_s3_artifact_root_on_a_named_endpoint_is_checked(answering_server: tuple[str, list[str]],
                                                                 tmp_path: Path) -> None:
    url, asked = answering_server
    storage.check_s3_endpoint(s3_settings(tmp_path, url))  # S3 answers an anonymous GET with 403: it answered
    assert asked == ["/"]
    storage.check_s3_endpoint(KeelSettings(home=tmp_path, s3_endpoint=f"http://127.0.0.1:{free_port()}"))
    storage.check_s3_endpoint(KeelSettings(home=tmp_path, artifact_root="s3://keel/artifacts"))  # AWS's own
    assert asked == ["/"]


def test_an_existence_check_on_an_endpoint_that_does_not_answer_names_the_object(tmp_path: Path) -> None:
    """The CLI summarizes a run through such checks: MinIO's MaxRetryError escaped them with a traceback."""
    settings = s3_settings(tmp_path, f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError, match=r"^s3://keel/artifacts/runs/r/check/manifest.json: cannot check the "
                                           r"object \(MaxRetryError"):
        storage.exists("s3://keel/artifacts/runs/r/check/manifest.json", settings)
