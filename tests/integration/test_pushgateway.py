"""Pipeline steps push their figures to a real Pushgateway (Debian package) on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from components.check_performance.component import check_performance
from components.ingest.component import ingest
from components.preprocess.component import preprocess
from keel.errors import ConfigError
from tests.conftest import small_frame
from tests.stages import register_small_model, small_config, write_small_source

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


def test_a_failed_step_says_so_and_keeps_the_figures_of_its_last_success(pushgateway: str, keel_home: Path,
                                                                        tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_PUSHGATEWAY_URL", pushgateway)
    config = small_config().to_json()
    group = 'instance="",job="keel_pipeline",pipeline="small",stage="ingest"'

    def pushed() -> dict[str, float]:
        text = httpx.get(f"http://{pushgateway}/metrics", timeout=10).text
        return {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if "{" + group + "}" in line}

    ingest.python_func(source=str(write_small_source(tmp_path, rows=150)), config=config, run_name="ok", job_id="j")
    succeeded = pushed()
    assert succeeded["keel_stage_failed"] == 0 and succeeded["keel_stage_rows"] == 150
    with pytest.raises(SystemExit):  # what a KFP step's process does on bad input: exit 1
        ingest.python_func(source=str(tmp_path / "missing.csv"), config=config, run_name="bad", job_id="j")
    failed = pushed()
    assert failed["keel_stage_failed"] == 1
    assert failed["keel_stage_rows"] == 150  # the last success's figures and time stay
    assert failed["keel_stage_last_success_timestamp_seconds"] == succeeded["keel_stage_last_success_timestamp_seconds"]
    ingest.python_func(source=str(write_small_source(tmp_path, rows=120)), config=config, run_name="again",
                       job_id="j")
    again = pushed()
    assert again["keel_stage_failed"] == 0 and again["keel_stage_rows"] == 120
    assert again["keel_stage_last_success_timestamp_seconds"] > succeeded["keel_stage_last_success_timestamp_seconds"]


def test_a_crashed_step_is_pushed_as_failed_and_still_raises(pushgateway: str, keel_home: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from keel.runs import open_stage

    monkeypatch.setenv("KEEL_PUSHGATEWAY_URL", pushgateway)
    with pytest.raises(ZeroDivisionError):  # a bug, not bad input: its traceback goes on to the step's log
        with open_stage("train", "crash", "j", small_config().to_json()):
            _ = 1 / 0
    text = httpx.get(f"http://{pushgateway}/metrics", timeout=10).text
    assert 'keel_stage_failed{instance="",job="keel_pipeline",pipeline="small",stage="train"} 1' in text


def test_the_charts_pushgateway_keeps_a_failure_across_a_restart(keel_home: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The Pushgateway started with the chart's own arguments (Debian's build of it): a step's failure pushed once
    must outlive a restart of the pod, or KeelPipelineStepFailed would clear by itself."""
    from keel.runs import open_stage
    from tests.deploy import render
    from tests.integration.conftest import free_port, start_service

    (deployment,) = [d for d in render.documents(render.helm_template()) if d["kind"] == "Deployment"
                     and d["metadata"]["name"] == "keel-pushgateway"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (mount,) = container["volumeMounts"]
    args = [arg.replace(mount["mountPath"], str(tmp_path)) for arg in container["args"]]
    port = free_port()
    command = ["prometheus-pushgateway", *args, f"--web.listen-address=127.0.0.1:{port}"]
    monkeypatch.setenv("KEEL_PUSHGATEWAY_URL", f"127.0.0.1:{port}")
    series = 'keel_stage_failed{instance="",job="keel_pipeline",pipeline="small",stage="train"} 1'
    gateway = start_service(command, port, tmp_path)
    try:
        with pytest.raises(SystemExit), open_stage("train", "bad", "j", small_config().to_json()):
            raise ConfigError("bad input")
        assert series in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        gateway.terminate()  # what Kubernetes sends a pod it stops
        gateway.wait(timeout=10)
    gateway = start_service(command, port, tmp_path)
    try:
        assert series in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        gateway.terminate()
        gateway.wait(timeout=10)


def test_an_unreachable_gateway_does_not_fail_the_step(keel_home: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("KEEL_PUSHGATEWAY_URL", "127.0.0.1:9")
    dataset = ingest.python_func(source=str(write_small_source(tmp_path)), config=small_config().to_json(),
                                 run_name="r1", job_id="j")
    assert dataset.endswith("/runs/r1/ingest")
    assert "could not push metrics" in capsys.readouterr().err


def test_a_check_on_labeled_rows_pushes_its_verdict_and_fills_the_kfp_artifacts(
        pushgateway: str, keel_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kfp.dsl import HTML, ClassificationMetrics, Metrics

    from keel.settings import load_settings
    from keel.monitor.performance import PerformanceCheckConfig

    register_small_model(load_settings(), "r1")
    monkeypatch.setenv("KEEL_PUSHGATEWAY_URL", pushgateway)
    frame = small_frame(200, seed=9)
    frame["outcome"] = frame["outcome"].map({"yes": "no", "no": "yes"})
    frame.to_csv(tmp_path / "labeled.csv", index=False)
    metrics, matrix = Metrics(uri=str(tmp_path / "metrics")), ClassificationMetrics(uri=str(tmp_path / "matrix"))
    report = HTML(uri=str(tmp_path / "report.html"))
    output_uri, degraded = check_performance.python_func(
        model_uri="models:/small-model@champion", source=str(tmp_path / "labeled.csv"),
        config=PerformanceCheckConfig(pipeline="model_performance").to_json(), run_name="check-1", job_id="j",
        metrics=metrics, classification_metrics=matrix, report=report)
    assert degraded is True and output_uri.endswith("/runs/check-1/check")
    assert metrics.metadata["f1_macro"] < 0.5 and matrix.metadata["confusionMatrix"]["annotationSpecs"]
    assert "small-model v1 on 200 labeled rows: DEGRADED" in (tmp_path / "report.html").read_text()
    text = httpx.get(f"http://{pushgateway}/metrics", timeout=10).text
    assert 'keel_model_degraded{instance="",job="keel_model_performance",model="small-model",version="1"} 1' in text
    assert 'keel_model_checked_rows{instance="",job="keel_model_performance",model="small-model",version="1"} 200' \
        in text
    assert 'keel_model_registered_metric{instance="",job="keel_model_performance",metric="f1_macro",' in text
