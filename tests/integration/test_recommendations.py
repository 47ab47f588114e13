"""ecommerce_recommendations end to end on a reduced config: `keel run`, the registry, Ray Serve."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow
from mlflow.types import DataType
import pytest

from keel.settings import load_settings
from tests.conftest import artifact_files
from tests.foreign_load import score_without_keel
from tests.integration.conftest import free_port
from tests.processes import (MeasuredRun, end_tree, finish, keel, process_tree, run_measuring_steps, start_keel,
                             steps_over_their_memory_limit)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MODEL = "ecommerce-recommendations"
# Two data-parallel workers with sparse gradients: the path a cluster takes for a large catalogue (from 5M
# parameters and 10,000 users + items); the own-ids run below trains one worker with dense ones.
REDUCED = ("interactions: {users: 1500, items: 600}\n"
           "train: {max_epochs: 12, sparse_gradients: true, scaling: {num_workers: 2, cpus_per_worker: 1}}\n")


@pytest.fixture(scope="module")
def measured_run(tmp_path_factory: pytest.TempPathFactory) -> MeasuredRun:
    return run_measuring_steps("ecommerce_recommendations", tmp_path_factory.mktemp("recommend"), REDUCED)


@pytest.fixture(scope="module")
def pipeline_run(measured_run: MeasuredRun) -> tuple[Path, dict]:
    return measured_run.workdir, measured_run.report


def test_each_step_stays_within_the_memory_limit_its_pod_gets(measured_run: MeasuredRun) -> None:
    measured = measured_run.step_memory
    assert set(measured) == {"interactions", "recommender-train", "recommender-evaluate", "recommender-register"}, measured
    assert steps_over_their_memory_limit(measured_run) == {}, measured


def test_the_recommender_beats_the_popular_list_and_becomes_champion(pipeline_run: tuple[Path, dict]) -> None:
    _, report = pipeline_run
    assert [s["stage"] for s in report["stages"]] == ["ingest", "train", "evaluate", "register"]
    trained = json.loads((Path(report["artifacts"]) / "train" / "manifest.json").read_text())
    assert trained["scaling"] == {"num_workers": 2, "cpus_per_worker": 1, "use_gpu": False}
    assert trained["sparse_gradients"] is True
    evaluation = json.loads((Path(report["artifacts"]) / "evaluate" / "evaluation.json").read_text())
    assert evaluation["ndcg_lift_over_popular"] >= 2.0, evaluation
    assert evaluation["recall_at_10"] > evaluation["baseline_popular"]["recall_at_10"]
    assert report["model_uri"] == f"models:/{MODEL}/1" and report["champion"] is True
    client = mlflow.MlflowClient(report["tracking_uri"])
    run = client.get_run(client.get_model_version(MODEL, "1").run_id)
    assert run.data.metrics["test_ndcg_at_10"] == pytest.approx(evaluation["ndcg_at_10"])
    assert run.data.metrics["popular_ndcg_at_10"] == pytest.approx(evaluation["baseline_popular"]["ndcg_at_10"])
    history = client.get_metric_history(run.info.run_id, "eval_ndcg_at_10")
    assert len(history) == 1
    workdir, _ = pipeline_run
    listed = json.loads(keel("models", "list", "--output", "json", cwd=workdir,
                             env={"KEEL_HOME": str(workdir / ".keel")}).stdout)
    assert listed[0]["metrics"]["test_ndcg_at_10"] == pytest.approx(evaluation["ndcg_at_10"])


def test_the_registered_pyfunc_answers_top_k_and_falls_back_for_strangers(pipeline_run: tuple[Path, dict]) -> None:
    workdir, report = pipeline_run
    mlflow.set_tracking_uri(report["tracking_uri"])
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    import pandas as pd

    answers = model.predict(pd.DataFrame({"user_id": [3, 10**9]}), params={"k": 5})
    known, stranger = answers.to_dict(orient="records")
    assert known["source"] == "personalized" and len(known["items"]) == 5
    ingested = Path(report["artifacts"]) / "ingest"  # the splits number users and items by their ids' order
    train = pd.read_parquet(ingested / "train.parquet")
    user_ids, item_ids = (pd.read_parquet(ingested / f"{kind}_ids.parquet")["id"] for kind in ("user", "item"))
    seen = item_ids[train.loc[train["user_id"] == user_ids.tolist().index(3), "item_id"]]
    assert not set(known["items"]) & set(seen) and set(known["items"]) <= set(item_ids)  # nothing seen is offered
    assert stranger["source"] == "popular" and not stranger["known_user"]

    # where keel is not installed (`mlflow models serve`, KServe): the model's own copy of keel's code answers
    elsewhere = score_without_keel(f"models:/{MODEL}@champion", pd.DataFrame({"user_id": [3, 10**9]}),
                                   report["tracking_uri"], workdir / "foreign", params={"k": 5})
    assert elsewhere.to_dict(orient="records") == answers.to_dict(orient="records")


def test_the_model_performance_pipeline_checks_the_recommender_on_later_interactions(
        pipeline_run: tuple[Path, dict]) -> None:
    """The interactions its evaluation held out, exported in the shop's own ids as later interactions would be:
    the check through kfp.local scores exactly what evaluation scored, and records the verdict."""
    import pandas as pd

    workdir, report = pipeline_run
    ingested = Path(report["artifacts"]) / "ingest"
    ids = {column: pd.read_parquet(ingested / f"{column}s.parquet")["id"].to_numpy() for column in ("user_id",
                                                                                                  "item_id")}
    test = pd.read_parquet(ingested / "test.parquet")
    test.assign(**{column: ids[column][test[column]] for column in ids}).to_csv(workdir / "later.csv", index=False)
    result = keel("run", "model_performance", "--param", f"model_uri=models:/{MODEL}/1", "--param",
                  f"source={workdir / 'later.csv'}", "--output", "json", cwd=workdir,
                  env={"KEEL_HOME": str(workdir / ".keel")})
    assert result.returncode == 0, result.stderr[-3000:]
    checked = json.loads((Path(json.loads(result.stdout)["artifacts"]) / "check" / "manifest.json").read_text())
    evaluation = json.loads((Path(report["artifacts"]) / "evaluate" / "evaluation.json").read_text())
    assert checked["verdict"] == "ok" and checked["rows"] == len(test), checked
    assert checked["metrics"]["ndcg_at_10"] == pytest.approx(evaluation["ndcg_at_10"], abs=1e-9)
    assert checked["summary"].startswith("ok: ndcg_at_10 ")
    version = mlflow.MlflowClient(report["tracking_uri"]).get_model_version(MODEL, "1")
    assert version.tags["keel.performance"].startswith("ok: ndcg_at_10 ")


def test_two_runs_at_once_get_their_own_paths_and_versions_and_a_failed_gate_keeps_the_champion(
        pipeline_run: tuple[Path, dict]) -> None:
    """Two pipeline runs started together, both with a gate they cannot pass: each writes under its own
    runs/<run>/ and registers its own version; neither takes the champion alias from version 1."""
    workdir, _ = pipeline_run
    # Small and short: these runs only have to register, never to be good
    (workdir / "strict.yaml").write_text("interactions: {users: 400, items: 200}\ntrain: {max_epochs: 1}\n"
                                         "evaluate: {min_lift_over_popular: 1000}\n")
    env = {"KEEL_HOME": str(workdir / ".keel")}
    runs = [start_keel("run", "ecommerce_recommendations", "--config", "strict.yaml", "--run-name", name, "--output",
                       "json", cwd=workdir, env=env) for name in ("concurrent-a", "concurrent-b")]
    reports = []
    try:
        for run in runs:
            result = finish(run, timeout_s=600)
            assert result.returncode == 0, result.stderr[-3000:]
            reports.append(json.loads(result.stdout))
    finally:
        for run in (run for run in runs if run.poll() is None):  # the other, when one failed: not left running
            end_tree(process_tree(run.pid))
    assert sorted(r["run_id"] for r in reports) == ["concurrent-a", "concurrent-b"]
    assert sorted(r["model_uri"] for r in reports) == [f"models:/{MODEL}/2", f"models:/{MODEL}/3"]
    files = artifact_files(load_settings(home=workdir / ".keel"))
    for report in reports:
        assert report["champion"] is False
        assert "most-popular baseline" in report["promotion"] and "min 1000" in report["promotion"]
        own = {f.split("/")[2] for f in files if f.startswith(f"runs/{report['run_id']}/")}
        assert own >= {"ingest", "train", "evaluate", "register", "checkpoints"}
        manifest = json.loads((Path(report["artifacts"]) / "train" / "manifest.json").read_text())
        assert report["run_id"] in manifest["checkpoints"]  # not the other run's checkpoints
    client = mlflow.MlflowClient(reports[0]["tracking_uri"])
    assert int(client.get_model_version_by_alias(MODEL, "champion").version) == 1


def test_a_bad_interactions_file_fails_by_column_and_writes_nothing(pipeline_run: tuple[Path, dict]) -> None:
    workdir, _ = pipeline_run
    (workdir / "clicks.csv").write_text("user_id,item_id,event,timestamp\n1,2,view,5\n1,3,wishlist,6\n")
    env = {"KEEL_HOME": str(workdir / ".keel")}
    before = artifact_files(load_settings(home=workdir / ".keel"))
    result = keel("run", "ecommerce_recommendations", "--param", f"source={workdir / 'clicks.csv'}",
                  "--output", "json", cwd=workdir, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "clicks.csv" in result.stderr and "column 'event'" in result.stderr and "wishlist" in result.stderr
    assert artifact_files(load_settings(home=workdir / ".keel")) == before


def test_a_users_own_ids_are_answered_in_those_ids(pipeline_run: tuple[Path, dict]) -> None:
    """Ids as a shop exports them (account names as text, item ids from a database past 2**32) and timestamps as
    ISO text: the run numbers them for the model, the registered model answers in them, and the champion (trained
    on integer ids of other users) is rescored through them. The gate is set to fail, so the champion stays
    version 1 for the serving test below."""
    import pandas as pd

    from keel.recommend.config import InteractionsConfig
    from keel.recommend.data import generate_interactions

    workdir, _ = pipeline_run
    frame = generate_interactions(InteractionsConfig(users=400, items=200))
    frame = frame.assign(user_id="cust-" + frame["user_id"].astype(str),
                         item_id=frame["item_id"] * 7_919 + 10**12,
                         timestamp=pd.to_datetime(frame["timestamp"], unit="s").dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
    frame.to_csv(workdir / "shop.csv", index=False)
    (workdir / "own.yaml").write_text("train: {max_epochs: 2}\nevaluate: {min_lift_over_popular: 1000}\n")
    result = keel("run", "ecommerce_recommendations", "--config", "own.yaml", "--param",
                  f"source={workdir / 'shop.csv'}", "--output", "json", cwd=workdir,
                  env={"KEEL_HOME": str(workdir / ".keel")})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["champion"] is False and "could not score" not in report["promotion"], report["promotion"]
    mlflow.set_tracking_uri(report["tracking_uri"])
    model = mlflow.pyfunc.load_model(report["model_uri"])
    assert model.metadata.get_input_schema().input_types() == [DataType.string]
    answers = model.predict(pd.DataFrame({"user_id": ["cust-0", "cust-9999"]}), params={"k": 5})
    known, stranger = answers.to_dict(orient="records")
    assert known["user_id"] == "cust-0" and known["source"] == "personalized"
    assert set(known["items"]) <= set(frame["item_id"]) and min(known["items"]) > 2**32
    assert stranger["source"] == "popular" and set(stranger["items"]) <= set(frame["item_id"])


@pytest.fixture
def served(pipeline_run: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    import ray
    from ray import serve

    from keel.serve.config import ServeConfig
    from keel.serve.deployment import deploy

    workdir, _ = pipeline_run
    monkeypatch.setenv("KEEL_HOME", str(workdir / ".keel"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        uri = f"models:/{MODEL}@champion"  # its own shadow: the same ranked lists every time
        yield deploy(uri, ServeConfig(port=free_port(), cpus_per_replica=0.5), shadow_uri=uri,
                     shadow_config=ServeConfig(cpus_per_replica=0.5))
    finally:
        serve.shutdown()
        ray.shutdown()


def test_ray_serve_answers_recommendations_and_rejects_bad_requests_with_a_reason(served: str) -> None:
    route = f"{served}/v1/models/{MODEL}:recommend"
    answer = httpx.post(route, json={"user_ids": [3, 10**9], "k": 4}, timeout=30)
    assert answer.status_code == 200 and answer.headers["x-model-version"] == "1"
    known, stranger = answer.json()["recommendations"]
    assert known["source"] == "personalized" and len(known["items"]) == 4 and known["known_user"]
    assert stranger["source"] == "popular" and not stranger["known_user"]
    for body, status, reason in [({"user_ids": []}, 422, "user_ids"), ({"user_ids": [1], "k": 0}, 422, "k"),
                                 ({"users": [1]}, 422, "users"), ("{not json", 400, "not valid JSON")]:
        kwargs = {"content": body} if isinstance(body, str) else {"json": body}
        response = httpx.post(route, timeout=30, headers={"content-type": "application/json"}, **kwargs)
        assert response.status_code == status and reason in response.json()["detail"], response.text
    assert httpx.post(f"{served}/v1/models/other:recommend", json={"user_ids": [1]}, timeout=30).status_code == 404
    metrics = httpx.get(f"{served}/metrics", timeout=30).text
    assert 'route="/v1/models/{name}:recommend"' in metrics
    # The shadow got a copy of the one answered request (not of the refused ones) and gave both users the same list
    labels = f'model="{MODEL}",shadow_version="1",version="1"'
    deadline = time.monotonic() + 60
    while f'keel_shadow_rows_total{{agreement="same",{labels}}} 2.0' not in metrics and time.monotonic() < deadline:
        time.sleep(1)  # copies are compared after the answer went out
        metrics = httpx.get(f"{served}/metrics", timeout=30).text
    assert f'keel_shadow_rows_total{{agreement="same",{labels}}} 2.0' in metrics
    assert f'keel_shadow_top_k_overlap_sum{{{labels}}} 2.0' in metrics
    assert 'keel_shadow_copies_total{model="%s",outcome="compared",version="1"} 1.0' % MODEL in metrics


def test_retraining_runs_the_recommender_pipeline_after_a_degraded_check(pipeline_run: tuple[Path, dict]) -> None:
    """retrain_recommendations_when_degraded: later interactions unrelated to each user's past make version 1's
    check degraded, so the ecommerce_recommendations sub-DAG trains, gates and registers a successor. (Last in
    the file: its successor may become champion.)"""
    import numpy as np
    import pandas as pd

    workdir, report = pipeline_run
    ingested = Path(report["artifacts"]) / "ingest"
    ids = {column: pd.read_parquet(ingested / f"{column}s.parquet")["id"].to_numpy() for column in ("user_id",
                                                                                                  "item_id")}
    test, train = (pd.read_parquet(ingested / f"{split}.parquet") for split in ("test", "train"))
    drifted = test.assign(item_id=np.random.default_rng(0).permutation(test["item_id"].to_numpy()))
    drifted = drifted.merge(train[["user_id", "item_id"]], how="left", indicator=True)
    drifted = drifted[drifted.pop("_merge") == "left_only"]  # not what they had already
    drifted.assign(**{column: ids[column][drifted[column]] for column in ids}).to_csv(workdir / "drifted.csv",
                                                                                      index=False)
    (workdir / "retrain.yaml").write_text("interactions: {users: 400, items: 200}\ntrain: {max_epochs: 2}\n")
    client = mlflow.MlflowClient(report["tracking_uri"])
    latest = max(int(v.version) for v in client.search_model_versions(f"name='{MODEL}'"))
    result = keel("run", "retrain_recommendations_when_degraded", "--config", "retrain.yaml", "--param",
                  f"labels_source={workdir / 'drifted.csv'}", "--param", f"model_uri=models:/{MODEL}/1",
                  "--output", "json", cwd=workdir, env={"KEEL_HOME": str(workdir / ".keel")})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert [s["stage"] for s in summary["stages"]] == ["check", "ingest", "train", "evaluate", "register"]
    checked = json.loads((Path(summary["artifacts"]) / "check" / "manifest.json").read_text())
    assert checked["summary"].startswith("degraded: ndcg_at_10 ")
    assert summary["model_uri"] == f"models:/{MODEL}/{latest + 1}"  # a successor, gated like any other run
    gate = json.loads((Path(summary["artifacts"]) / "evaluate" / "evaluation.json").read_text())["gate"]
    assert any("vs champion v" in reason for reason in gate["reasons"]) and summary["champion"] == gate["passed"]
