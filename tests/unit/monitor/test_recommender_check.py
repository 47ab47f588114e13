"""A registered recommender checked on the interactions that came in after it (real MLflow on SQLite)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from keel import storage, tracking
from keel.cli.evaluate import DEGRADED_EXIT_CODE, print_verdict
from keel.cli.models import KEY_METRICS, list_models, shown_key_metric
from keel.config import parse_pipeline_config
from keel.errors import ConfigError, DataError
from keel.monitor.performance import PerformanceConfig, check_performance
from keel.monitor.verdict import PERFORMANCE_TAG, verdict_registry
from keel.recommend.config import RecommendPipelineConfig
from keel.recommend.data import BUILTIN_SOURCE, ID_FILES, prepare
from keel.recommend.evaluate import evaluate_recommender
from keel.recommend.model import FactorizationSpec, MatrixFactorization, bpr_optimizer, save_factorization
from keel.recommend.registry import register_recommender
from keel.recommend.train import bpr_epoch, seen_pairs
from keel.lineage import version_lineage
from keel.settings import KeelSettings
from tests.unit.monitor.test_performance import checks, labeled_table
from tests.processes import keel

MODEL = "models:/shop@champion"
STRICT = PerformanceConfig(tolerance=0.005)  # the pipeline's own gate tolerance on NDCG@10


@pytest.fixture
def shop(settings: KeelSettings) -> dict[str, pd.DataFrame]:
    """shop v1: a factorization trained a few BPR epochs on the generator's interactions, evaluated and registered
    as the pipeline's steps do (config logged as params); returns its splits in the generator's own ids."""
    config = parse_pipeline_config({
        "pipeline": "ecommerce_recommendations",
        "interactions": {"users": 300, "items": 120, "mean_interactions": 20, "seed": 7},
        "evaluate": {"k": 5, "tolerance": 0.005, "min_lift_over_popular": 1.1},  # top 5, not the default 10
        "registry": {"model_name": "shop", "promotion_metric": "ndcg_at_5"}}, "test config")
    assert isinstance(config, RecommendPipelineConfig)
    uris = {stage: storage.stage_uri(settings, "r1", stage) for stage in ("ingest", "train", "evaluate", "register")}
    splits = prepare(BUILTIN_SOURCE, config.interactions, config.split, uris["ingest"], settings)
    train = pd.read_parquet(splits["splits"]["train"])
    spec = FactorizationSpec(users=splits["users"], items=splits["items"], embedding_dim=16)
    torch.manual_seed(0)
    model = MatrixFactorization(spec)
    optimizer = bpr_optimizer(model, 0.02, sparse=False)
    users, items = (torch.tensor(train[column].to_numpy()) for column in ("user_id", "item_id"))
    for epoch in range(15):
        bpr_epoch(model, optimizer, users, items, seen_pairs(train, spec), config.train.model_dump(),
                  torch.Generator().manual_seed(epoch))
    with storage.staged_output(uris["train"], "train", settings) as out:
        save_factorization(model, spec, out.dir)
    evaluate_recommender(uris["train"], uris["ingest"], uris["evaluate"], settings, config.evaluate, config.registry)
    register_recommender(uris["train"], uris["evaluate"], uris["ingest"], config.registry,
                         config.model_dump(mode="json"), "r1", config.pipeline, uris["register"], settings)
    ids = {column: pd.read_parquet(uri)["id"].to_numpy() for column, uri in splits["ids"].items()}
    return {name: pd.read_parquet(uri).assign(**{column: lambda f, c=column: ids[c][f[c]] for column in ID_FILES})
            for name, uri in splits["splits"].items()}


def test_the_held_out_interactions_score_as_registered_and_later_tastes_are_degraded(
        shop: dict[str, pd.DataFrame], settings: KeelSettings, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    client = tracking.mlflow_client(settings)
    registered = json.loads(Path(client.download_artifacts(client.get_model_version("shop", "1").run_id,
                                                           "evaluation.json", str(tmp_path))).read_text())
    test, train = shop["test"], shop["train"]
    first = train.iloc[0]
    strays = pd.DataFrame({"user_id": [10**9, first["user_id"], first["user_id"]],
                           "item_id": [first["item_id"], 10**9, first["item_id"]],  # the last: seen in training
                           "event": "view", "timestamp": 1_800_000_000})
    newcomers = test[test["user_id"].isin(test["user_id"].unique()[:30])].assign(user_id=lambda f: f["user_id"] + 10**8)
    source = labeled_table(tmp_path, pd.concat([test, strays, newcomers]), "late.csv")
    checked = check_performance(MODEL, source, str(tmp_path / "ok"), settings, STRICT)
    # The split it was registered on, read back as raw interactions, scores exactly what evaluation scored.
    assert checked["verdict"] == "ok" and checked["rows"] == len(test)
    assert checked["metrics"]["ndcg_at_5"] == pytest.approx(registered["ndcg_at_5"], abs=1e-9)
    assert checked["metrics"]["recall_at_5"] == pytest.approx(registered["recall_at_5"], abs=1e-9)
    assert checked["left_out"] == {"unknown_user": 1 + len(newcomers), "unknown_item": 1, "already_seen": 1}
    # Users it does not know get the most-popular list; that is scored for them, beside the verdict.
    (served,) = mlflow.pyfunc.load_model(MODEL).predict(pd.DataFrame({"user_id": [10**9]}), params={"k": 5})["items"]
    expected = served_scores(list(served), pd.concat([newcomers, strays.iloc[:1]]))
    assert checked["new_users"] == {"users": 31, "interactions": len(newcomers) + 1,
                                    "ndcg_at_5": pytest.approx(expected["ndcg"]),
                                    "recall_at_5": pytest.approx(expected["recall"])}
    assert checked["measured_on"] == f"{len(test)} new interactions of {test['user_id'].nunique()} users"
    version = client.get_model_version("shop", "1")
    assert version.tags[PERFORMANCE_TAG].startswith("ok: ndcg_at_5 ")
    run = client.get_run(checked["mlflow_run_id"])
    assert run.data.metrics["popular_ndcg_at_5"] < run.data.metrics["ndcg_at_5"]
    assert run.data.metrics["new_users"] == 31 and run.data.metrics["new_users_ndcg_at_5"] == checked["new_users"][
        "ndcg_at_5"]
    live = {sample.labels["metric"]: sample.value for family in verdict_registry(checked).collect()
            for sample in family.samples if sample.name == "keel_model_live_metric"}  # pushed to the Pushgateway
    assert live["new_users_ndcg_at_5"] == pytest.approx(expected["ndcg"]) and "new_users" not in live
    print_verdict(checked)
    shown = capsys.readouterr().out
    assert (f"New users: 31 users the model does not know were served the most-popular list: ndcg@5 "
            f"{expected['ndcg']:.4f}, recall@5 {expected['recall']:.4f} on their {len(newcomers) + 1} "
            f"interactions") in shown
    assert "<h3>New users</h3><p>31 users" in Path(checked["report_html"]).read_text()
    logged = client.get_logged_model(tracking.logged_model_id(version.source))
    assert {m.key for m in logged.metrics if m.run_id == run.info.run_id} >= {"ndcg_at_5", "recall_at_5"}
    lineage = version_lineage("shop", "champion", settings)  # trained on the train split of the generator's data
    assert [(d["name"], Path(d["source"]).name) for d in lineage["datasets"]] == [("ecommerce_interactions",
                                                                                  "train.parquet")]
    assert lineage["params"]["dataset.source"] == BUILTIN_SOURCE and lineage["params"]["evaluate.k"] == "5"
    (listed,) = list_models()  # `keel models list` shows its NDCG at its own k in the recommenders' column
    assert shown_key_metric(listed["metrics"], KEY_METRICS["test_ndcg@k"]) == f"{registered['ndcg_at_5']:.4f}"

    # The same users went on to items that have nothing to do with their past ones: degraded.
    rng = np.random.default_rng(0)
    drifted = test.assign(item_id=rng.permutation(test["item_id"].to_numpy()))
    drifted = drifted[~drifted.set_index(["user_id", "item_id"]).index.isin(
        train.set_index(["user_id", "item_id"]).index)]
    result = keel("evaluate", MODEL, labeled_table(tmp_path, drifted, "drifted.csv"), str(tmp_path / "drifted"),
                  "--tolerance", "0.005", "--fail-if-degraded", "-o", "json", cwd=tmp_path)
    assert result.returncode == DEGRADED_EXIT_CODE, result.stderr[-2000:]
    verdict = json.loads(result.stdout)
    assert verdict["metrics"]["ndcg_at_5"] < registered["ndcg_at_5"] - 0.005
    assert any(re.match(r"ndcg_at_5 0\.\d{4} vs registered v1 ", f) for f in verdict["failures"]), verdict
    assert len(checks(client)) == 2 and "degraded" in client.get_model_version("shop", "1").tags[PERFORMANCE_TAG]


def served_scores(served: list[int], interactions: pd.DataFrame) -> dict[str, float]:
    """NDCG and recall of one list served to every user, averaged over users, written out longhand."""
    ndcgs, recalls = [], []
    for _, used in interactions.groupby("user_id")["item_id"]:
        relevant = set(used)
        gains = [1 / np.log2(rank + 2) for rank, item in enumerate(served) if item in relevant]
        ideal = sum(1 / np.log2(rank + 2) for rank in range(min(len(relevant), len(served))))
        ndcgs.append(sum(gains) / ideal)
        recalls.append(len(gains) / len(relevant))
    return {"ndcg": float(np.mean(ndcgs)), "recall": float(np.mean(recalls))}


def test_too_few_users_or_a_file_it_cannot_read_is_refused_by_name_and_leaves_no_trace(
        shop: dict[str, pd.DataFrame], settings: KeelSettings, tmp_path: Path) -> None:
    test = shop["test"]
    few = labeled_table(tmp_path, test[test["user_id"].isin(test["user_id"].unique()[:3])], "few.csv")
    with pytest.raises(DataError, match=re.escape(f"{few}: 3 user(s) with new interactions the model can be "
                                                  f"tested on (6 interactions); a verdict needs at least 50")):
        check_performance(MODEL, few, str(tmp_path / "out"), settings)
    untimed = labeled_table(tmp_path, test.drop(columns=["timestamp"]), "untimed.csv")
    with pytest.raises(DataError, match=re.escape(untimed) + ".*timestamp"):
        check_performance(MODEL, untimed, str(tmp_path / "out"), settings)
    with pytest.raises(ConfigError, match=r"models:/shop/1 is a recommender: it reads the columns its training file"):
        check_performance(MODEL, few, str(tmp_path / "out"), settings, PerformanceConfig(label_column="item"))
    client = tracking.mlflow_client(settings)
    assert not storage.exists(str(tmp_path / "out"), settings) and checks(client) == []
    assert PERFORMANCE_TAG not in client.get_model_version("shop", "1").tags
