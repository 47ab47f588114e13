"""Score the recommender and the most-popular baseline on the held-out interactions, then gate.

The gate is :func:`keel.gate.decide` on NDCG@k (the champion rescored on the
same held-out rows when it can be) plus one rule of this pipeline: the model
must beat the popular list by ``min_lift_over_popular``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from keel import storage, tracking
from keel.config import RegisterConfig
from keel.evaluate import gate_with_rescored_champion
from keel.gate import GateDecision
from keel.recommend.config import RecommendEvaluateConfig
from keel.recommend.metrics import popularity_scorer, ranking_metrics, seen_items
from keel.recommend.model import MatrixFactorization, load_factorization
from keel.settings import KeelSettings

EVALUATION_FILE = "evaluation.json"


def model_scorer(model: MatrixFactorization) -> Any:
    return lambda users: model.score_all(torch.from_numpy(np.asarray(users))).numpy()


def gate(metrics: dict[str, float], baseline: dict[str, float], k: int, config: RecommendEvaluateConfig,
         registry: RegisterConfig | None, score_split: Any, ids: dict[str, np.ndarray],
         settings: KeelSettings) -> tuple[GateDecision, dict | None]:
    """The promotion metric against the champion rescored on this split (through the ids: the champion may
    have been trained on other users and items), and a lift over the popular list."""
    ndcg, popular = metrics[f"ndcg_at_{k}"], baseline[f"ndcg_at_{k}"]
    return gate_with_rescored_champion(
        metrics, f"ndcg_at_{k}", registry, settings,
        lambda python_model: score_split(python_model.recommender.scorer(ids["user_id"], ids["item_id"])),
        config.tolerance,
        (ndcg >= config.min_lift_over_popular * popular,
         f"NDCG@{k} {ndcg:.4f} is {ndcg / max(popular, 1e-12):.2f}x the most-popular baseline's {popular:.4f} "
         f"(min {config.min_lift_over_popular}x)"))


def evaluate_recommender(model_uri: str, splits_uri: str, output_uri: str, settings: KeelSettings,
                         config: RecommendEvaluateConfig, registry: RegisterConfig | None = None,
                         mlflow_run_id: str = "") -> dict[str, Any]:
    """Recall@k and NDCG@k of the model and of the popular list on the test split; the gate decision."""
    with storage.staged_output(output_uri, "evaluate", settings) as out, \
            tempfile.TemporaryDirectory(prefix="keel-evaluate-") as scratch:
        splits = storage.read_manifest(splits_uri, settings)
        train = storage.read_parquet(splits["splits"]["train"], settings)
        test = storage.read_parquet(splits["splits"]["test"], settings)
        popularity = storage.read_parquet(splits["popularity"], settings)
        seen = seen_items(train)

        def score_split(scorer: Any) -> dict[str, float]:
            return ranking_metrics(scorer, test, seen, config.k, splits["items"])

        model = load_factorization(storage.download_directory(model_uri, Path(scratch) / "model", settings))
        metrics = score_split(model_scorer(model))
        baseline = score_split(popularity_scorer(popularity, splits["items"]))
        ids = {column: storage.read_parquet(uri, settings)["id"].to_numpy() for column, uri in splits["ids"].items()}
        decision, champion = gate(metrics, baseline, config.k, config, registry, score_split, ids, settings)
        k = config.k
        report = {**metrics, "baseline_popular": baseline, "k": k,
                  "ndcg_lift_over_popular": metrics[f"ndcg_at_{k}"] / max(baseline[f"ndcg_at_{k}"], 1e-12),
                  "gate": decision.to_dict(), "champion": champion, "model_uri": model_uri}
        out.write_json(EVALUATION_FILE, report)
        if mlflow_run_id:
            tracking.mlflow_client(settings).log_batch(mlflow_run_id, metrics=_mlflow_metrics(report))
        out.manifest.update(
            {name: report[name] for name in (f"recall_at_{k}", f"ndcg_at_{k}", "ndcg_lift_over_popular")},
            evaluation=out.uri_of(EVALUATION_FILE), gate_passed=decision.passed, gate=decision.summary,
            summary=(f"NDCG@{k} {metrics[f'ndcg_at_{k}']:.4f} vs popular {baseline[f'ndcg_at_{k}']:.4f} "
                     f"({report['ndcg_lift_over_popular']:.2f}x); {decision.verdict}"))
    return report


def _mlflow_metrics(report: dict[str, Any]) -> list[Any]:
    import time

    from mlflow.entities import Metric

    k, now = report["k"], int(time.time() * 1000)
    values = {f"eval_recall_at_{k}": report[f"recall_at_{k}"], f"eval_ndcg_at_{k}": report[f"ndcg_at_{k}"],
              f"popular_recall_at_{k}": report["baseline_popular"][f"recall_at_{k}"],
              f"popular_ndcg_at_{k}": report["baseline_popular"][f"ndcg_at_{k}"],
              "ndcg_lift_over_popular": report["ndcg_lift_over_popular"],
              "gate_passed": float(report["gate"]["passed"])}
    return [Metric(name, float(value), now, 0) for name, value in values.items()]


def emit_kfp_metrics(report: dict[str, Any], metrics: Any) -> None:
    """The headline numbers on the KFP run page (a ``dsl.Metrics`` output)."""
    k = report["k"]
    for name in (f"recall_at_{k}", f"ndcg_at_{k}", "ndcg_lift_over_popular"):
        metrics.log_metric(name, round(float(report[name]), 6))
    metrics.log_metric(f"popular_ndcg_at_{k}", round(float(report["baseline_popular"][f"ndcg_at_{k}"]), 6))
    metrics.log_metric("gate_passed", float(report["gate"]["passed"]))
