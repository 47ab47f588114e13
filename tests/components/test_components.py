"""Components called directly (``python_func``), as KFP's own component tests do.

The full DAG through kfp.local is exercised in tests/integration.
"""

import json
from pathlib import Path

import pytest

from components.ingest.component import ingest
from components.preprocess.component import preprocess
from keel import storage
from keel.runs import ERROR_MARKER, find_stage_error
from keel.settings import KeelSettings
from tests.conftest import artifact_files
from tests.stages import small_config, write_small_source


@pytest.fixture
def config_json() -> str:
    return small_config().to_json()


def test_ingest_then_preprocess(config_json: str, settings: KeelSettings, tmp_path: Path) -> None:
    dataset = ingest.python_func(source=str(write_small_source(tmp_path)), config=config_json,
                                 run_name="run-1", job_id="ignored")
    assert dataset == storage.stage_uri(settings, "run-1", "ingest")
    splits = preprocess.python_func(dataset_uri=dataset, config=config_json, run_name="", job_id="job-7")
    assert splits == storage.stage_uri(settings, "job-7", "preprocess")  # no run name: the KFP job id
    assert storage.read_manifest(splits, settings)["rows"]["train"] > 0


def test_keel_errors_exit_1_with_the_headline_marked(config_json: str, settings: KeelSettings,
                                                      capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as raised:
        ingest.python_func(source="missing.csv", config=config_json, run_name="r", job_id="j")
    assert raised.value.code == 1
    error = find_stage_error(capsys.readouterr().out)
    assert error is not None and error["stage"] == "ingest" and "missing.csv: no such file" in error["error"]
    assert artifact_files(settings) == []


def test_a_bad_config_fails_the_first_step(settings: KeelSettings, capsys: pytest.CaptureFixture) -> None:
    config = json.loads(small_config().to_json())
    config["train"]["hidden_sizes"] = []
    with pytest.raises(SystemExit):
        ingest.python_func(source="builtin://breast_cancer", config=json.dumps(config), run_name="r", job_id="j")
    output = capsys.readouterr().out
    assert ERROR_MARKER in output and "train.hidden_sizes" in output
    assert artifact_files(settings) == []
