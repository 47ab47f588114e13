"""`keel serve` on this machine and a port another program holds: refused by name before Ray starts.

Before, Serve's proxy failed to bind and Serve's REST API answered HTTP 500 with a Python traceback, which
`keel serve` printed as its error.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from keel.cli import app
from keel.serve import control
from keel.serve.config import ServeConfig
from keel.settings import KeelSettings


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another program listens on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_a_port_another_program_listens_on_is_refused_naming_it(held_port: int, tmp_path: Path) -> None:
    settings = KeelSettings(home=tmp_path)  # no Ray head of Keel's on this machine
    with pytest.raises(control.ServeError, match=f"^port {held_port} on 127.0.0.1 is taken by another program, so "
                                                 r"Serve cannot listen there: stop that program, or serve on another "
                                                 r"port \(--port\)\.$"):
        control.refuse_a_port_held_elsewhere(ServeConfig(port=held_port), settings)


def test_the_port_this_machines_serve_holds_is_rolled_not_refused(held_port: int, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve's REST status names its proxies and their port: that is the server a second deploy rolls."""
    def serving(port: int) -> dict[str, Any]:
        return {"proxies": {"node": {"status": "HEALTHY"}}, "http_options": {"host": "127.0.0.1", "port": port}}

    settings = KeelSettings(home=tmp_path)
    monkeypatch.setattr(control, "_serving_status", lambda dashboard, s: serving(held_port))
    control.refuse_a_port_held_elsewhere(ServeConfig(port=held_port), settings)
    monkeypatch.setattr(control, "_serving_status", lambda dashboard, s: serving(held_port + 1))
    with pytest.raises(control.ServeError, match="taken by another program"):
        control.refuse_a_port_held_elsewhere(ServeConfig(port=held_port), settings)


def test_a_port_left_in_time_wait_by_a_server_just_stopped_is_free() -> None:
    """The server side that closes first keeps the port in TIME_WAIT for a minute: `keel serve stop` then
    `keel serve` again must not read that as a program holding it."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do (asyncio's, HAProxy)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    assert control.port_in_use("127.0.0.1", port)
    accepted.close()  # the server closes first: its side of the connection waits in TIME_WAIT
    server.close()
    client.close()
    assert not control.port_in_use("127.0.0.1", port)


def test_a_pipeline_run_form_port_out_of_range_fails_the_deploy_step_by_name(tmp_path: Path) -> None:
    """The Kubeflow UI's run form takes any integer for serve_port: the deploy step said so in a pydantic
    traceback."""
    from keel.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^serve_port 99999: expected a port, 1 to 65535\.$"):
        control.deploy_champion("models:/medical-diagnosis/1", 99999, KeelSettings(home=tmp_path))


def test_status_and_stop_with_nothing_served_here_say_so_and_clear_a_dead_heads_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ended in "cannot reach the Ray dashboard ... Is Ray running?" and exit 1, as if stopping nothing
    were a fault; a record of a head that died stayed behind."""
    from typer.testing import CliRunner

    from keel.cli import app

    monkeypatch.setattr(control, "port_in_use", lambda host, port: False)  # nothing on the dashboard's port
    record = tmp_path / "serve" / "ray-head.json"
    record.parent.mkdir(parents=True)
    record.write_text('{"process_group": 999999999, "dashboard_port": 8265}')
    env = {"KEEL_HOME": str(tmp_path), "KEEL_RAY_DASHBOARD_URL": "", "KEEL_RAY_ADDRESS": ""}
    for args in (["serve", "stop"], ["serve", "status"]):
        result = CliRunner().invoke(app, args, env=env)
        assert result.exit_code == 0 and result.output == (
            "No model is being served here (no Ray head of `keel serve --detach` runs).\n"), result.output
    status = CliRunner().invoke(app, ["serve", "status", "--output", "json"], env=env)
    assert status.exit_code == 0 and json.loads(status.output) == {"applications": {}}
    assert not record.exists()
    monkeypatch.setattr(control, "port_in_use", lambda host, port: True)  # a head answers there: ask it
    assert not control.no_local_head(KeelSettings(home=tmp_path))
    assert control.no_local_head(KeelSettings(home=tmp_path, ray_dashboard_url="http://ray:8265")) is False


def _two_champions_in_turn(settings: KeelSettings, name: str = "diagnosis") -> object:
    """v1 promoted by the gate with no champion before it, then v2 over v1, as the register step moves them."""
    from keel import tracking
    from keel.config import RegisterConfig
    from keel.registry import promote

    client = tracking.mlflow_client(settings)
    client.create_registered_model(name)
    for version, before in (("1", None), ("2", "1")):
        client.create_model_version(name, source=f"{settings.artifact_root}/{name}/{version}")
        promote(client, RegisterConfig(model_name=name), version,
                {"champion_version": before, "passed": True, "failures": [], "reasons": ["f1_macro better"]})
    return client


def test_a_champion_the_deploy_step_cannot_serve_hands_champion_back_and_a_retry_serves_nothing(
        settings: KeelSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, a failed deploy left the new version champion while the old one served: the registry named a
    model nobody answered with, and KFP's retry of the step would have served it behind the run's back."""
    from keel import tracking

    client: Any = _two_champions_in_turn(settings)
    attempts: list[str] = []

    def failing_roll(model_uri: str, port: int, _: KeelSettings) -> str:
        attempts.append(model_uri)
        raise control.ServeError("the model server failed to start: ModelLoadError")

    monkeypatch.setattr(control, "_serve_champion", failing_roll)
    monkeypatch.setattr(control, "_served_here", lambda name, _: ("dashboard", {}, [{"name": "keel"}]))  # v1 serves
    with pytest.raises(control.ServeError, match=r"ModelLoadError\. Champion is back at v1, which serves as before; "
                                                 r"v2 stays challenger, tagged keel.deploy_failed\."):
        control.deploy_champion("models:/diagnosis/2", 8000, settings)
    assert tracking.champion_version(client, "diagnosis") == "1"
    assert str(client.get_model_version_by_alias("diagnosis", "challenger").version) == "2"
    assert "ModelLoadError" in client.get_model_version("diagnosis", "2").tags["keel.deploy_failed"]
    listed = CliRunner().invoke(app, ["models", "list"])
    assert re.search(r"^diagnosis +2 +challenger,deploy failed ", listed.stdout, re.MULTILINE), listed.stdout
    with pytest.raises(control.ServeError, match=r"models:/diagnosis/2 is not champion now \(v1 is\)"):
        control.deploy_champion("models:/diagnosis/2", 8000, settings)  # the step's retry
    assert attempts == ["models:/diagnosis/2"]


@pytest.mark.parametrize("first", [True, False])
def test_a_champion_the_deploy_step_cannot_serve_where_nothing_served_its_model_stays_champion(
        settings: KeelSettings, monkeypatch: pytest.MonkeyPatch, first: bool) -> None:
    """No champion serves to go back to: the first version, or one over a champion nobody served."""
    from keel import tracking

    client: Any = _two_champions_in_turn(settings)
    if first:
        client.set_registered_model_alias("diagnosis", "champion", "1")  # as if v2 was never promoted
    version = "1" if first else "2"

    def port_taken(*_: object) -> str:
        raise control.ServeError("port 8000 on 127.0.0.1 is taken by another program")

    monkeypatch.setattr(control, "_serve_champion", port_taken)
    monkeypatch.setattr(control, "_served_here", lambda name, _: None)
    with pytest.raises(control.ServeError, match=r"^port 8000 on 127.0.0.1 is taken by another program$"):
        control.deploy_champion(f"models:/diagnosis/{version}", 8000, settings)
    assert tracking.champion_version(client, "diagnosis") == version
    assert "is taken" in client.get_model_version("diagnosis", version).tags["keel.deploy_failed"]


def test_waiting_for_a_model_is_not_failed_by_the_config_before_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a cluster KubeRay applies the patched config a moment later: until then Serve still reports the one
    before, which may have failed itself. Only the asked-for model's failure ends the wait."""
    def application(model: str, state: str) -> dict[str, Any]:
        return {"applications": {"keel": {"status": state, "message": f"{model} {state}",
                                          "deployed_app_config": {"args": {"model_uri": model}}}}}

    answers = iter([application("models:/m/1", "DEPLOY_FAILED"), application("models:/m/2", "DEPLOYING"),
                    application("models:/m/2", "RUNNING")])
    monkeypatch.setattr(control, "status_rest", lambda dashboard: next(answers))
    monkeypatch.setattr(control.time, "sleep", lambda seconds: None)
    assert control.wait_until_running("http://head:8265", model_uri="models:/m/2")["status"] == "RUNNING"
    failing = iter([application("models:/m/2", "DEPLOYING"), application("models:/m/2", "DEPLOY_FAILED")])
    monkeypatch.setattr(control, "status_rest", lambda dashboard: next(failing))
    with pytest.raises(control.ServeError, match="failed to start: models:/m/2 DEPLOY_FAILED"):
        control.wait_until_running("http://head:8265", model_uri="models:/m/2")
