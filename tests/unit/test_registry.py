"""Registration against a real MLflow (SQLite) with real stage outputs."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from keel import storage, tracking
from keel.evaluate import EVALUATION_FILE
from keel.registry import CHALLENGER, CHAMPION, beats, flatten_params, register
from keel.settings import KeelSettings
from tests.stages import run_stages, small_config, write_small_source

MODEL = "small-model"


@pytest.fixture
def staged_run(settings: KeelSettings, tmp_path: Path) -> dict[str, str]:
    return run_stages(settings, "run-a", write_small_source(tmp_path))


def _register(uris: dict[str, str], settings: KeelSettings, run_id: str = "run-a") -> dict:
    config = small_config()
    return register(uris["train"], uris["evaluate"], uris["ingest"], uris["preprocess"], config.registry,
                    config.model_dump(mode="json", exclude={"contract"}), run_id, "small",
                    storage.stage_uri(settings, run_id, "register"), settings)


def _set_f1(uris: dict[str, str], value: float) -> None:
    path = Path(uris["evaluate"]) / EVALUATION_FILE
    evaluation = json.loads(path.read_text())
    path.write_text(json.dumps({**evaluation, "f1_macro": value}))


def _aliases(settings: KeelSettings) -> dict[str, str]:
    return {k: str(v) for k, v in tracking.mlflow_client(settings).get_registered_model(MODEL).aliases.items()}


def test_first_version_becomes_champion_with_lineage(staged_run: dict, settings: KeelSettings) -> None:
    registered = _register(staged_run, settings)
    assert registered["version"] == "1" and registered["promoted"]
    assert _aliases(settings) == {CHAMPION: "1", CHALLENGER: "1"}
    run = tracking.mlflow_client(settings).get_run(registered["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.PIPELINE_RUN_TAG] == "run-a"
    assert run.data.tags[tracking.GIT_COMMIT_TAG] == "test-commit"
    assert run.data.params["train.learning_rate"] == "0.001"
    assert "test_f1_macro" in run.data.metrics
    digest = storage.read_manifest(staged_run["ingest"], settings)["sha256"]
    assert run.inputs.dataset_inputs[0].dataset.digest == digest[:16]


def test_pyfunc_scores_raw_columns(staged_run: dict, settings: KeelSettings, tmp_path: Path) -> None:
    _register(staged_run, settings)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@{CHAMPION}")
    raw = pd.read_csv(tmp_path / "small.csv").drop(columns=["outcome"])
    predicted = model.predict(raw.head(20))
    assert set(predicted["prediction"]) <= {"yes", "no"}
    assert predicted[["probability_no", "probability_yes"]].sum(axis=1).round(5).eq(1).all()
    assert model.metadata.get_input_schema().input_names() == list(raw.columns)


def test_worse_challenger_leaves_the_champion(settings: KeelSettings, tmp_path: Path) -> None:
    first = run_stages(settings, "run-a", write_small_source(tmp_path))
    _set_f1(first, 0.9)
    _register(first, settings, "run-a")
    second = run_stages(settings, "run-b", tmp_path / "small.csv")
    _set_f1(second, 0.8)
    registered = _register(second, settings, "run-b")
    assert not registered["promoted"] and "0.8000 vs champion v1 0.9000" in registered["reason"]
    assert _aliases(settings) == {CHAMPION: "1", CHALLENGER: "2"}


def test_failure_after_registration_withdraws_the_version(staged_run: dict, settings: KeelSettings,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _register(staged_run, settings)
    def broken_publish(*args: object) -> None:
        raise OSError("disk full")
    monkeypatch.setattr(storage, "publish_directory", broken_publish)
    with pytest.raises(OSError, match="disk full"):
        _register(staged_run, settings)
    client = tracking.mlflow_client(settings)
    assert [str(v.version) for v in client.search_model_versions(f"name='{MODEL}'")] == ["1"]
    assert _aliases(settings) == {CHAMPION: "1", CHALLENGER: "1"}


@pytest.mark.parametrize("candidate, incumbent, greater, expected", [
    (0.9, None, True, True), (0.9, 0.8, True, True), (0.8, 0.9, True, False),
    (0.8, 0.9, False, True), (float("nan"), None, True, False), (0.5, float("nan"), True, True),
])
def test_beats(candidate: float, incumbent: float | None, greater: bool, expected: bool) -> None:
    assert beats(candidate, incumbent, greater) is expected


def test_flatten_params() -> None:
    assert flatten_params({"train": {"lr": 0.1, "sizes": [1, 2], "scaling": {"gpu": "auto"}}}) == {
        "train.lr": "0.1", "train.sizes": "[1, 2]", "train.scaling.gpu": "auto"}
