"""The MLflow pods' migration step on the failures a platform engineer meets: a database it cannot reach, and a
migration that fails. (Against a real PostgreSQL, three replicas at once: tests/integration/test_mlflow_chart_server.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from keel import tracking_store
from tests.integration.conftest import free_port


def test_an_unreachable_postgresql_fails_naming_the_store_and_the_settings(capsys: pytest.CaptureFixture) -> None:
    uri = f"postgresql://keel:hunter2-secret@127.0.0.1:{free_port()}/mlflow"
    assert tracking_store.main([uri, "--connect-timeout", "1"]) == 1
    out, err = capsys.readouterr()
    assert f"cannot reach MLflow's backend store postgresql://keel:***@127.0.0.1:" in err
    assert "within 1 s" in err and "(postgresql.*)" in err and "PGPASSWORD" in err
    assert "waiting for PostgreSQL at 127.0.0.1" in out and "hunter2-secret" not in out + err


def test_a_failed_migration_names_mlflows_command_and_stops(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    (tmp_path / "mlflow.db").write_text("not a database")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking_store.main([store, "--auth"]) == 1
    err = capfd.readouterr().err
    assert "error: `mlflow db upgrade` failed (its output is above)" in err
    assert "mlflow.server.auth" not in err.split("error:")[-1]  # the auth migration did not run after it
