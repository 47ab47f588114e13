"""The medical_diagnosis pipeline end to end through `keel run` (kfp.local, local Ray, MLflow on SQLite)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest

from keel.cli.run import mlflow_ui_command
from keel.data.builtin import write_builtin_csv
from keel.settings import load_settings
from tests.conftest import artifact_files
from tests.integration.conftest import free_port, wait_for_port
from tests.processes import MeasuredRun, keel, run_measuring_steps, steps_over_their_memory_limit

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> MeasuredRun:
    """One successful demo run in a fresh working directory, and each step's peak memory."""
    return run_measuring_steps("medical_diagnosis", tmp_path_factory.mktemp("demo"),
                               env={"KEEL_GIT_COMMIT": "abc123"})


@pytest.fixture(scope="module")
def demo(demo_run: MeasuredRun) -> tuple[Path, dict]:
    """The demo run's working directory and report, shared by the tests below."""
    return demo_run.workdir, demo_run.report


def test_each_step_stays_within_the_memory_limit_its_pod_gets(demo_run: MeasuredRun) -> None:
    """Its own local Ray included: on a cluster without the chart's Ray, a step runs Ray in its pod."""
    assert set(demo_run.step_memory) == {stage["stage"] for stage in demo_run.report["stages"]}, demo_run.step_memory
    assert steps_over_their_memory_limit(demo_run) == {}, demo_run.step_memory


def test_demo_trains_a_good_model_and_registers_a_champion(demo: tuple[Path, dict]) -> None:
    _, report = demo
    assert report["succeeded"] and report["error"] is None
    assert [s["stage"] for s in report["stages"]] == ["ingest", "validate", "preprocess", "tune", "train", "compress",
                                                      "evaluate", "register"]
    assert report["test_metrics"]["accuracy"] >= 0.95
    assert report["model_uri"] == "models:/medical-diagnosis/1" and report["champion"] is True


def test_champion_predicts_raw_csv_columns(demo: tuple[Path, dict]) -> None:
    workdir, report = demo
    mlflow.set_tracking_uri(report["tracking_uri"])
    model = mlflow.pyfunc.load_model("models:/medical-diagnosis@champion")
    table = pd.read_csv(write_builtin_csv("builtin://breast_cancer", workdir / "raw.csv"))
    predicted = model.predict(table.drop(columns=["diagnosis"]))
    assert (predicted["prediction"] == table["diagnosis"]).mean() >= 0.95


def test_the_batch_scoring_pipeline_scores_a_table_as_the_registered_pyfunc_does(demo: tuple[Path, dict]) -> None:
    workdir, report = demo
    (workdir / "keep.yaml").write_text("predict: {keep: [diagnosis], batch_rows: 100}\n")
    result = keel("run", "batch_scoring", "--config", "keep.yaml", "--output", "json", cwd=workdir,
                  env={"KEEL_HOME": str(workdir / ".keel")})
    assert result.returncode == 0, result.stderr[-3000:]
    scoring = json.loads(result.stdout)
    assert [s["stage"] for s in scoring["stages"]] == ["predict"] and scoring["model_uri"] is None
    scored = pd.read_parquet(scoring["predictions"])
    assert list(scored.columns) == ["diagnosis", "prediction", "probability_benign", "probability_malignant"]
    mlflow.set_tracking_uri(report["tracking_uri"])
    table = pd.read_csv(write_builtin_csv("builtin://breast_cancer", workdir / "raw.csv"))
    expected = mlflow.pyfunc.load_model("models:/medical-diagnosis@champion").predict(table.drop(columns=["diagnosis"]))
    assert list(scored["prediction"]) == list(expected["prediction"]) and len(scored) == len(table)
    assert list(scored["diagnosis"]) == list(table["diagnosis"])


def test_the_model_performance_pipeline_judges_the_champion_by_its_own_registration(
        demo: tuple[Path, dict]) -> None:
    workdir, report = demo
    result = keel("run", "model_performance", "--output", "json", cwd=workdir,
                  env={"KEEL_HOME": str(workdir / ".keel")})
    assert result.returncode == 0, result.stderr[-3000:]
    checked = json.loads(result.stdout)
    assert [s["stage"] for s in checked["stages"]] == ["check"] and checked["model_uri"] is None
    manifest = json.loads((Path(checked["artifacts"]) / "check" / "manifest.json").read_text())
    assert manifest["model_uri"] == "models:/medical-diagnosis/1" and manifest["rows"] == 569
    # the demo table holds the rows it was trained on, so it scores at least as well as its test split did
    assert manifest["verdict"] == "ok", manifest["reasons"]
    assert any(r.startswith("ok: slice mean_radius [12, 15)") for r in manifest["reasons"])  # its config's slices
    assert any(r.startswith("ok: equalized_odds_difference over mean_radius") and "(max 0.5)" in r
               for r in manifest["reasons"])
    client = mlflow.MlflowClient(report["tracking_uri"])
    tag = client.get_model_version("medical-diagnosis", "1").tags["keel.performance"]
    assert tag.startswith("ok: f1_macro ") and "on 569 labeled rows of breast_cancer" in tag

    table = pd.read_csv(write_builtin_csv("builtin://breast_cancer", workdir / "raw.csv"))
    table["diagnosis"] = table["diagnosis"].map({"benign": "malignant", "malignant": "benign"})
    table.to_csv(workdir / "relabeled.csv", index=False)
    degraded = keel("evaluate", "models:/medical-diagnosis@champion", "relabeled.csv", "checked",
                    "--fail-if-degraded", cwd=workdir, env={"KEEL_HOME": str(workdir / ".keel")})
    assert degraded.returncode == 3 and "Verdict: DEGRADED" in degraded.stdout, degraded.stderr[-3000:]


def test_training_checkpointed_every_epoch_and_logged_metrics_from_rank_0(demo: tuple[Path, dict]) -> None:
    workdir, report = demo
    run_dir = Path(report["artifacts"])
    train = json.loads((run_dir / "train" / "manifest.json").read_text())
    assert (run_dir / "checkpoints" / f"train-{report['run_id']}").is_dir()
    assert list((run_dir / "checkpoints" / f"train-{report['run_id']}").glob("checkpoint_*"))
    client = mlflow.MlflowClient(report["tracking_uri"])
    version = client.get_model_version("medical-diagnosis", "1")
    history = client.get_metric_history(version.run_id, "val_loss")
    assert len(history) == train["epochs"] and [m.step for m in history] == list(range(1, train["epochs"] + 1))
    assert client.get_run(version.run_id).data.tags["mlflow.source.git.commit"] == "abc123"


def test_tuned_config_trained_compressed_variant_registered_and_gate_logged(demo: tuple[Path, dict]) -> None:
    workdir, report = demo
    run_dir = Path(report["artifacts"])
    tuned, train, compressed = (json.loads((run_dir / s / "manifest.json").read_text())
                                for s in ("tune", "train", "compress"))
    assert tuned["trials"] == 12 and tuned["best_config"]
    spec = json.loads((run_dir / "train" / "model.json").read_text())
    assert spec["hidden_sizes"] == tuned["best_config"]["hidden_sizes"]  # the search's best fed training
    assert compressed["chosen"] in compressed["variants"] and len(compressed["variants"]) == 5
    assert compressed["variants"]["int8"]["size_bytes"] * 3.5 < compressed["variants"]["baseline"]["size_bytes"]
    mlflow.set_tracking_uri(report["tracking_uri"])  # for load_model below, whichever test ran first
    client = mlflow.MlflowClient(report["tracking_uri"])
    version = client.get_model_version("medical-diagnosis", "1")
    run = client.get_run(version.run_id)
    assert run.data.tags["keel.compression.chosen"] == compressed["chosen"]
    # and `keel models show` says which variant the version is, and why it won
    shown = keel("models", "show", "medical-diagnosis", "1", cwd=workdir).stdout
    assert re.search(rf"\n  variant:\s+{compressed['chosen']}: fastest at batch 1 \(", shown), shown
    assert run.data.tags["keel.gate"] == "passed" and run.data.metrics["gate_passed"] == 1.0
    assert any(k.startswith("slice/mean_radius/") for k in run.data.metrics)
    logged = {a.path for a in client.list_artifacts(version.run_id, "evaluation")}
    assert {"evaluation/calibration_curve.png", "evaluation/report.html"} <= logged
    assert {a.path for a in client.list_artifacts(version.run_id, "compression")} >= {
        "compression/report.json", "compression/accuracy_vs_latency.png"}
    trials = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{version.run_id}'")
    assert len(trials) == 12
    # what was registered is the chosen variant, not the trained teacher
    served = mlflow.pyfunc.load_model("models:/medical-diagnosis/1").unwrap_python_model().predictor
    chosen = compressed["variants"][compressed["chosen"]]
    if compressed["chosen"] != "int8":  # quantized weights are packed, not parameters
        assert sum(p.numel() for p in served.model.parameters()) == chosen["parameters"]
    predicted = mlflow.pyfunc.load_model("models:/medical-diagnosis/1").predict(
        pd.read_parquet(run_dir / "preprocess" / "test_raw.parquet").drop(columns=["diagnosis"]))
    assert len(predicted) == 114


def test_the_printed_mlflow_ui_command_shows_the_runs_compression_plot(demo: tuple[Path, dict]) -> None:
    """The summary's "Browse it:" line opens MLflow's UI on the run's store, where the variants' plot is; its
    "MLflow run:" link is the registered version's run, in the pipeline's own experiment."""
    _, report = demo
    command = shlex.split(mlflow_ui_command(report["tracking_uri"]) or "")
    assert command[1:] == ["ui", "--backend-store-uri", report["tracking_uri"]] and Path(command[0]).exists()
    run_id = mlflow.MlflowClient(report["tracking_uri"]).get_model_version("medical-diagnosis", "1").run_id
    experiment_id, linked_run_id = re.fullmatch(r"http://127\.0\.0\.1:5000/#/experiments/(\w+)/runs/(\w+)",
                                                report["mlflow_run_url"]).groups()
    assert linked_run_id == run_id
    port = free_port()
    with subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True) as ui:
        try:
            wait_for_port(port, timeout_s=60)
            plot = httpx.get(f"http://127.0.0.1:{port}/get-artifact", timeout=30,
                             params={"path": "compression/accuracy_vs_latency.png", "run_uuid": run_id})
            experiment = httpx.get(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get", timeout=30,
                                   params={"experiment_id": experiment_id})
        finally:
            os.killpg(ui.pid, signal.SIGTERM)
    assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG"), plot.text[:300]
    assert experiment.json()["experiment"]["name"] == "medical_diagnosis", experiment.text[:300]


def test_bad_source_fails_cleanly_and_registers_nothing(demo: tuple[Path, dict]) -> None:
    workdir, report = demo
    table = pd.read_csv(write_builtin_csv("builtin://breast_cancer", workdir / "bad.csv"))
    table.loc[:4, "mean_radius"] = -1.0
    table.to_csv(workdir / "bad.csv", index=False)
    env = {"KEEL_HOME": str(workdir / ".keel")}
    result = keel("run", "medical_diagnosis", "--param", f"source={workdir / 'bad.csv'}", "--output", "json",
                  cwd=workdir, env=env)
    assert result.returncode == 1
    assert "bad.csv" in result.stderr and "column 'mean_radius': 5 value(s) outside" in result.stderr
    assert "Traceback" not in result.stderr
    failed = json.loads(result.stdout)
    assert failed["error"]["stage"] == "validate" and failed["model_uri"] is None
    assert not any(path.startswith(f"runs/{failed['run_id']}/validate") for path in
                   artifact_files(load_settings(home=workdir / ".keel")))
    listed = json.loads(keel("models", "list", "--output", "json", cwd=workdir, env=env).stdout)
    assert [(m["version"], m["aliases"]) for m in listed] == [(1, ["challenger", "champion"])]


@pytest.mark.parametrize("name, column", [("nested_object.jsonl", "city"), ("list_cells.parquet", "city"),
                                          ("giant_field.csv", "city")])
def test_malformed_corpus_files_fail_keel_run_by_name(demo: tuple[Path, dict], name: str, column: str) -> None:
    """A few corpus files through the real CLI (all of them go through the stages in tests/unit/data)."""
    from tests.corpus.malformed import DIRECTORY

    workdir, _ = demo
    env = {"KEEL_HOME": str(workdir / ".keel")}
    before = artifact_files(load_settings(home=workdir / ".keel"))
    result = keel("run", "medical_diagnosis", "--param", f"source={DIRECTORY / name}", "--output", "json",
                  cwd=workdir, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert name in result.stderr and f"column {column!r}" in result.stderr
    assert artifact_files(load_settings(home=workdir / ".keel")) == before  # the artifact store is unchanged
    listed = json.loads(keel("models", "list", "--output", "json", cwd=workdir, env=env).stdout)
    assert [m["version"] for m in listed] == [1]


def test_a_failed_training_step_marks_the_mlflow_run_failed_and_registers_nothing(demo: tuple[Path, dict]) -> None:
    """The train step fails after tuning opened the MLflow run: that run ends FAILED, no version appears."""
    workdir, report = demo
    env = {"KEEL_HOME": str(workdir / ".keel")}
    impossible = workdir / "impossible.yaml"
    impossible.write_text("tune: {num_samples: 0}\ncompress: {methods: []}\n"
                          "train: {scaling: {num_workers: 8, cpus_per_worker: 1}}\n")
    result = keel("run", "medical_diagnosis", "--config", str(impossible), "--output", "json", cwd=workdir, env=env)
    assert result.returncode == 1 and "scaling asks for 8 worker(s)" in result.stderr
    failed = json.loads(result.stdout)
    assert failed["error"]["stage"] == "train" and failed["model_uri"] is None
    client = mlflow.MlflowClient(report["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("medical_diagnosis").experiment_id],
                              f"tags.`keel.pipeline_run_id` = '{failed['run_id']}'")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not any(path.startswith(f"runs/{failed['run_id']}/train") for path in
                   artifact_files(load_settings(home=workdir / ".keel")))
    assert [v.version for v in client.search_model_versions("name='medical-diagnosis'")] == [1]



def test_a_users_own_table_trains_from_a_drafted_contract_and_the_printed_config(demo: tuple[Path, dict]) -> None:
    """Another table than the bundled one (an id, a '?' marker, nulls, a 0/1 label): `keel contract draft`
    writes the contract and prints the config; saved as printed (plus a short training), `keel run` trains on
    it, registers the new model's first version and the pyfunc scores the raw rows."""
    import yaml

    from tests.conftest import heart_table

    workdir, report = demo
    env = {"KEEL_HOME": str(workdir / ".keel")}
    table = heart_table(300)
    table.to_csv(workdir / "heart.csv", index=False)
    drafted = keel("contract", "draft", str(workdir / "heart.csv"), "--target", "target", "--output",
                   "own/contract.yaml", cwd=workdir, env=env)
    assert drafted.returncode == 0, drafted.stderr
    assert "left out patient_id: an identifier" in drafted.stdout and "look at ca:" in drafted.stdout
    printed = drafted.stdout.split("save this config beside it")[1].split("and train:")[0]
    config = yaml.safe_load("\n".join(line[2:] for line in printed.splitlines()[2:]))
    assert config["contract"] == "contract.yaml" and config["registry"]["model_name"] == "heart"
    config.update({"tune": {"num_samples": 0}, "compress": {"methods": []}, "train": {"max_epochs": 5}})
    (workdir / "own" / "keel.yaml").write_text(yaml.safe_dump(config))
    again = keel("contract", "draft", str(workdir / "heart.csv"), "--target", "target", "--output",
                 "own/contract.yaml", cwd=workdir, env=env)
    assert again.returncode == 1 and "exists; pass --force" in again.stderr
    result = keel("run", "medical_diagnosis", "--param", f"source={workdir / 'heart.csv'}", "--config",
                  "own/keel.yaml", "--output", "json", cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning" not in result.stderr  # kfp.local's notices on pod resources, twice a step, are not shown
    trained = json.loads(result.stdout)
    assert trained["model_uri"] == "models:/heart/1" and trained["champion"] is True
    mlflow.set_tracking_uri(report["tracking_uri"])
    predicted = mlflow.pyfunc.load_model("models:/heart@champion").predict(table.drop(columns=["target"]).head(20))
    assert set(predicted["prediction"]) <= {"0", "1"} and len(predicted) == 20


# Last in this file: it registers a version beside the demo's, which the tests above count on being alone.
def test_retrain_when_degraded_checks_first_and_trains_a_successor_only_when_the_labels_say_so(
        demo: tuple[Path, dict]) -> None:
    workdir, report = demo
    env = {"KEEL_HOME": str(workdir / ".keel")}
    (workdir / "quick.yaml").write_text("tune: {num_samples: 0}\ncompress: {methods: []}\ntrain: {max_epochs: 2}\n")
    table = pd.read_csv(write_builtin_csv("builtin://breast_cancer", workdir / "raw.csv"))
    client = mlflow.MlflowClient(report["tracking_uri"])
    versions_before = {v.version for v in client.search_model_versions("name='medical-diagnosis'")}

    fine = keel("run", "retrain_when_degraded", "--param", "labels_source=raw.csv", "--config", "quick.yaml",
                "--output", "json", cwd=workdir, env=env)
    assert fine.returncode == 0, fine.stderr[-3000:]
    assert [s["stage"] for s in json.loads(fine.stdout)["stages"]] == ["check"]  # ok: nothing trained
    assert {v.version for v in client.search_model_versions("name='medical-diagnosis'")} == versions_before

    table["diagnosis"] = table["diagnosis"].map({"benign": "malignant", "malignant": "benign"})
    table.to_csv(workdir / "relabeled.csv", index=False)
    retrained = keel("run", "retrain_when_degraded", "--param", "labels_source=relabeled.csv", "--config", "quick.yaml",
                     "--output", "json", cwd=workdir, env=env)
    assert retrained.returncode == 0, retrained.stderr[-3000:]
    summary = json.loads(retrained.stdout)
    assert [s["stage"] for s in summary["stages"]] == ["check", "ingest", "validate", "preprocess", "tune", "train",
                                                       "compress", "evaluate", "register"]
    new = int(summary["model_uri"].rsplit("/", 1)[1])
    assert str(new) not in versions_before  # a successor, gated against the champion like any other run
    gate = json.loads((Path(summary["artifacts"]) / "evaluate" / "manifest.json").read_text())["gate"]
    assert "vs champion v" in gate and summary["champion"] == gate.startswith("gate passed")
