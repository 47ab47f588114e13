"""Pipeline steps push their figures to a real Pushgateway (Debian package) on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from components.ingest.component import ingest
from components.preprocess.component import preprocess
from tests.stages import small_config, write_small_source

pytestmark = pytest.mark.integration


def test_stages_push_duration_and_rows(pushgateway: str, keel_home: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_PUSHGATEWAY_URL", pushgateway)
    config = small_config().to_json()
    dataset = ingest.python_func(source=str(write_small_source(tmp_path, rows=150)), config=config,
                                 run_name="r1", job_id="j")
    preprocess.python_func(dataset_uri=dataset, config=config, run_name="r1", job_id="j")
    text = httpx.get(f"http://{pushgateway}/metrics", timeout=10).text
    assert 'keel_stage_rows{instance="",job="keel_pipeline",pipeline="small",stage="ingest"} 150' in text
    assert 'keel_stage_rows{instance="",job="keel_pipeline",pipeline="small",stage="preprocess"} 150' in text
    assert 'keel_stage_duration_seconds{instance="",job="keel_pipeline",pipeline="small",stage="ingest"}' in text


def test_an_unreachable_gateway_does_not_fail_the_step(keel_home: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("KEEL_PUSHGATEWAY_URL", "127.0.0.1:9")
    dataset = ingest.python_func(source=str(write_small_source(tmp_path)), config=small_config().to_json(),
                                 run_name="r1", job_id="j")
    assert dataset.endswith("/runs/r1/ingest")
    assert "could not push metrics" in capsys.readouterr().err
