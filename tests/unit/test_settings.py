from pathlib import Path

import pytest

from keel.errors import ConfigError
from keel.settings import load_settings


def test_defaults_live_under_home(keel_home: Path) -> None:
    settings = load_settings()
    assert settings.home == keel_home.resolve()
    assert settings.artifact_root == str(keel_home / "artifacts")
    assert settings.mlflow_tracking_uri == f"sqlite:///{keel_home / 'mlflow.db'}"
    assert settings.ray_address == "" and settings.kfp_host == ""


def test_relative_home_is_pinned_to_the_working_directory(keel_home: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KEEL_HOME", "state")
    assert load_settings().home == tmp_path / "state"


def test_environment_overrides(keel_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_ARTIFACT_ROOT", "s3://bucket/prefix/")
    monkeypatch.setenv("KEEL_S3_ENDPOINT", "http://127.0.0.1:9000")
    monkeypatch.setenv("KEEL_S3_ACCESS_KEY", "id")
    monkeypatch.setenv("KEEL_S3_SECRET_KEY", "hunter2")
    settings = load_settings()
    assert settings.artifact_root == "s3://bucket/prefix"
    assert settings.s3_environment()["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert "hunter2" not in repr(settings)


def test_bad_values_name_the_variable(keel_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_S3_ENDPOINT", "minio:9000")
    with pytest.raises(ConfigError, match="KEEL_S3_ENDPOINT"):
        load_settings()


def test_unknown_fields_are_rejected(keel_home: Path) -> None:
    with pytest.raises(ConfigError, match="KEEL_MLFLOW_URI"):
        load_settings(mlflow_uri="sqlite://")


def test_settings_are_frozen(keel_home: Path) -> None:
    settings = load_settings()
    with pytest.raises(Exception):
        settings.ray_address = "auto"  # type: ignore[misc]


@pytest.mark.parametrize("address, dashboard, service, expected", [
    ("", "", "", ""),
    ("ray://raycluster-head-svc:10001", "", "", "http://raycluster-head-svc:8265"),
    ("ray://head:10001", "http://dash:8265/", "", "http://dash:8265"),
    ("auto", "", "", ""),
    # the chart's config: KEEL_RAY_ADDRESS is the training cluster, which serves nothing
    ("http://keel-train-head-svc:8265", "", "keel-serve", "http://keel-serve-head-svc.keel.svc.cluster.local:8265"),
    ("http://keel-train-head-svc:8265", "http://other:8265", "keel-serve", "http://other:8265"),
])
def test_serve_dashboard_url(keel_home: Path, address: str, dashboard: str, service: str, expected: str) -> None:
    assert load_settings(ray_address=address, ray_dashboard_url=dashboard, ray_service=service,
                         kube_namespace="keel").serve_dashboard_url == expected


@pytest.mark.parametrize("address, autoscaling, can_grow", [
    ("", "true", False),  # a local Ray: nothing adds nodes
    ("auto", "true", True),  # a Ray job on the chart's autoscaling RayCluster
    ("auto", "false", False),  # the dev overlay's fixed-size cluster
])
def test_only_a_cluster_with_an_autoscaler_can_grow(keel_home: Path, monkeypatch: pytest.MonkeyPatch,
                                                    address: str, autoscaling: str, can_grow: bool) -> None:
    monkeypatch.setenv("KEEL_RAY_AUTOSCALING", autoscaling)
    monkeypatch.setenv("KEEL_RAY_MAX_GPUS", "4")
    settings = load_settings(ray_address=address)
    assert settings.ray_can_grow is can_grow and settings.ray_max_gpus == 4
    monkeypatch.setenv("KEEL_RAY_MAX_GPUS", "-1")
    with pytest.raises(ConfigError, match="KEEL_RAY_MAX_GPUS"):
        load_settings()


def test_a_misnamed_variable_is_named_with_the_setting_it_nearly_is(keel_home: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic-settings ignores unknown KEEL_* names: a guessed one would leave the default in force silently."""
    import warnings

    monkeypatch.setenv("KEEL_MLFLOW_URI", "http://mlflow:5000")  # a word left out
    monkeypatch.setenv("KEEL_S3_ENDPIONT", "http://minio:9000")  # a typo
    with pytest.warns(UserWarning) as caught:
        settings = load_settings()
    assert settings.mlflow_tracking_uri.startswith("sqlite://")  # what the warning is about
    assert sorted(str(w.message) for w in caught) == [
        "KEEL_MLFLOW_URI is not a Keel setting, so it is ignored; did you mean KEEL_MLFLOW_TRACKING_URI?",
        "KEEL_S3_ENDPIONT is not a Keel setting, so it is ignored; did you mean KEEL_S3_ENDPOINT?"]
    for name in ("KEEL_MLFLOW_URI", "KEEL_S3_ENDPIONT"):
        monkeypatch.delenv(name)
    for tool_variable in ("KEEL_E2E_KFP_HOST", "KEEL_E2E_STEP_NAMESPACE", "KEEL_BENCH_REPEATS", "KEEL_CRDS_DIR",
                          "KEEL_VERSION"):
        monkeypatch.setenv(tool_variable, "1")  # the test and bench tools' own: not near a setting
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_settings()


def test_a_keel_home_that_cannot_be_created_is_named_with_the_setting_to_change(tmp_path: Path) -> None:
    """It ended in a FileNotFoundError traceback from `keel run` (the logs) or any registry command (SQLite)."""
    from typer.testing import CliRunner

    from keel.cli import app

    (tmp_path / "a-file").write_text("")
    home = tmp_path / "a-file" / "keel"
    for command in (["run", "medical_diagnosis"], ["models", "list"]):
        result = CliRunner().invoke(app, command, env={"KEEL_HOME": str(home), "KEEL_MLFLOW_TRACKING_URI": ""})
        assert result.exit_code == 1 and isinstance(result.exception, ConfigError), result.output
        assert str(result.exception).startswith(f"{home}") and "cannot create this directory (Not a directory)" in \
            str(result.exception) and "Point KEEL_HOME" in str(result.exception)
