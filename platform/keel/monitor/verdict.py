"""Where a check's verdict goes: the output's manifest, the version's tag, an MLflow run, KFP and Prometheus.

:mod:`keel.monitor.performance` judges a version on late labels (a recommender, with
:mod:`keel.monitor.ranking`, on later interactions); this module records what it found, in the places people
look. A classifier's report and a recommender's share one shape here: ``headline`` names the metrics shown
and compared, ``measured_on`` says what they were measured on.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keel import storage, tracking
from keel.evaluate import HEADLINE_METRICS, PLOTS, REPORT_HTML
from keel.settings import KeelSettings

if TYPE_CHECKING:
    import pandas as pd
    from prometheus_client import CollectorRegistry

    from keel.monitor.performance import Registration

PERFORMANCE_FILE = "performance.json"
PERFORMANCE_TAG = tracking.PERFORMANCE
EVALUATED_MODEL_TAG, EVALUATED_VERSION_TAG = "keel.evaluated_model", "keel.evaluated_version"
PUSH_JOB = "keel_model_performance"


def performance_manifest(report: dict[str, Any], model_uri: str, source: str) -> dict[str, Any]:
    """The figures a caller acts on, without the curves."""
    return {"model_uri": f"models:/{report['model_name']}/{report['version']}", "requested_uri": model_uri,
            "model_name": report["model_name"], "version": report["version"], "source": source,
            "verdict": report["verdict"], "metric": report["metric"], "rows": report["rows"],
            "unlabeled_rows": report["unlabeled_rows"], "reasons": report["gate"]["reasons"],
            "failures": report["gate"]["failures"], "mlflow_run_id": report["mlflow_run_id"],
            "metrics": {name: _finite(report[name]) for name in report["headline"]},
            "measured_on": report["measured_on"],
            **{key: report[key] for key in ("left_out", "new_users") if key in report},
            "registered": {name: _finite(value) for name, value in report["registered"].items()},
            "summary": f"{summary_line(report)} of {source}"}


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def summary_line(report: dict[str, Any]) -> str:
    """Verdict, the promotion metric now and at registration, and the rows it is measured on."""
    metric, registered = report["metric"], report["registered"].get(report["metric"])
    then = f"{registered:.4f}" if isinstance(registered, int | float) else "n/a"
    return f"{report['verdict']}: {metric} {report[metric]:.4f} (registered {then}) on {report['measured_on']}"


def summary_tag(report: dict[str, Any], source: str) -> str:
    """The version's ``keel.performance`` tag: the summary line, the file and the day."""
    return f"{summary_line(report)} of {storage.filename(source)}, {time.strftime('%Y-%m-%d', time.gmtime())}"


def labeled_dataset(frame: pd.DataFrame, source: str, sha256: str, target: str | None) -> Any:
    """The checked table as an MLflow dataset, with the file's own digest."""
    from keel.registry import table_dataset

    return table_dataset(frame, source, storage.filename(source), sha256[:16], target)


def log_check(report: dict[str, Any], directory: Path, registration: Registration, dataset: Any,
              source: str, settings: KeelSettings) -> str:
    """A run beside the version's own, FAILED if logging breaks off: metrics linked to the logged model and the
    labeled table, the report and plots as artifacts. Returns the run id."""
    import mlflow

    from keel.evaluate import metric_key

    client = tracking.mlflow_client(settings)
    run = client.create_run(registration.experiment_id,
                            run_name=f"evaluate-{registration.name}-v{registration.version}",
                            tags={EVALUATED_MODEL_TAG: registration.name, EVALUATED_VERSION_TAG: registration.version,
                                  "keel.verdict": report["verdict"], "keel.evaluation_source": source})
    run_id = str(run.info.run_id)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_input(dataset, context="evaluation")
        values = {name: report[name] for name in report["headline"]}
        values.update({metric_key("slice", s["column"], s["slice"], m): s[m] for s in report.get("slices", [])
                       for m in HEADLINE_METRICS})
        values.update({metric_key("fairness", column, name): measures[name]
                       for column, measures in report.get("fairness", {}).items()
                       for name in ("demographic_parity_difference", "equalized_odds_difference")})
        values.update({f"popular_{name}": value for name, value in report.get("baseline_popular", {}).items()
                       if name in report["headline"]})
        values.update(new_user_metrics(report.get("new_users", {})))
        values.update(rows=report["rows"], unlabeled_rows=report["unlabeled_rows"],
                      degraded=float(report["verdict"] == "degraded"))
        mlflow.log_metrics({k: float(v) for k, v in values.items() if math.isfinite(v)},
                           model_id=registration.model_id, dataset=dataset)
        for name in (*PLOTS, REPORT_HTML, PERFORMANCE_FILE):
            if (directory / name).exists():
                mlflow.log_artifact(str(directory / name), "performance")
    return run_id


def new_user_metrics(section: dict[str, Any]) -> dict[str, float]:
    """A recommender check's figures for users the model did not know, as flat metric names: ``new_users``,
    ``new_users_interactions``, ``new_users_ndcg_at_10``, ..."""
    return {"new_users" if name == "users" else f"new_users_{name}": float(value) for name, value in section.items()}


def emit_kfp_check(report: dict[str, Any], metrics: Any, classification: Any) -> None:
    """The check's figures on the KFP run page: a classifier's as its evaluate step shows them (confusion
    matrix and ROC curve included); a recommender's ranking metrics, which have no ClassificationMetrics."""
    from keel.evaluate import emit_kfp_metrics

    if "classes" in report:
        emit_kfp_metrics(report, metrics, classification)
        return
    for name in report["headline"]:
        if math.isfinite(report[name]):
            metrics.log_metric(name, round(float(report[name]), 6))
    for name, value in new_user_metrics(report.get("new_users", {})).items():
        metrics.log_metric(name, round(value, 6))
    metrics.log_metric("gate_passed", float(report["gate"]["passed"]))


def verdict_registry(manifest: dict[str, Any]) -> CollectorRegistry:
    """The verdict and metrics of one check as gauges labelled by model and version."""
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry()
    labels = {"model": manifest["model_name"], "version": manifest["version"]}
    Gauge("keel_model_degraded", "1 when the latest check on labeled rows found the model degraded.",
          list(labels), registry=registry).labels(**labels).set(float(manifest["verdict"] == "degraded"))
    Gauge("keel_model_checked_rows", "Labeled rows (a recommender's new interactions) the latest check scored.",
          list(labels), registry=registry).labels(**labels).set(manifest["rows"])
    live = Gauge("keel_model_live_metric", "A metric on the latest check's labeled rows.", [*labels, "metric"],
                 registry=registry)
    registered = Gauge("keel_model_registered_metric", "The same metric on the test split it was registered on.",
                       [*labels, "metric"], registry=registry)
    for name in manifest["metrics"]:
        for gauge, values in ((live, manifest["metrics"]), (registered, manifest["registered"])):
            if values.get(name) is not None:
                gauge.labels(**labels, metric=name).set(values[name])
    for name, value in new_user_metrics(manifest.get("new_users", {})).items():  # the popular list they got
        if name.startswith(("new_users_ndcg", "new_users_recall")):
            live.labels(**labels, metric=name).set(value)
    return registry


def push_verdict(gateway: str, manifest: dict[str, Any]) -> None:
    """:func:`verdict_registry` under job ``keel_model_performance``, one group per model, so each check
    replaces the last; a gateway that is down only warns (the verdict is already recorded)."""
    from prometheus_client import push_to_gateway

    try:
        push_to_gateway(gateway, job=PUSH_JOB, grouping_key={"model": manifest["model_name"]},
                        registry=verdict_registry(manifest), timeout=10)
    except OSError as e:
        print(f"keel: warning: could not push the verdict to {gateway}: {e}", file=sys.stderr)
