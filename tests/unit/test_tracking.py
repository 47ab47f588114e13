"""Reaching the MLflow tracking server: a server that does not answer fails every command in seconds, by name.

MLflow's client retries a refused connection 7 times with backoff, minutes a call: `keel run` against a stopped
server took 8 minutes and ended in a traceback from the step, then another from the CLI itself.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from keel import tracking
from keel.cli import app
from keel.cli.run import _mark_mlflow_run_failed
from keel.errors import TrackingError
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
    _mark_mlflow_run_failed(settings, "medical-diagnosis-20261207-000000-abcdef")
    err = capsys.readouterr().err
    assert err.startswith("keel: warning: could not mark the MLflow run of medical-diagnosis-20261207-000000-abcdef "
                          "FAILED: cannot reach the MLflow tracking server")
