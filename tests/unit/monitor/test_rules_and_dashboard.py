"""The alert rules pass promtool (real Prometheus tooling) and the dashboard only queries real metrics.

Both live in the chart (helm/keel/files/), which ships them as a PrometheusRule and a Grafana
dashboard ConfigMap: one copy, tested here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from keel.monitor.push import stage_registry
from keel.monitor.verdict import verdict_registry
from keel.serve.canary import CanaryMetrics
from keel.serve.metrics import ServingMetrics
from keel.serve.shadow import ShadowMetrics

MONITOR = Path(__file__).resolve().parents[3] / "helm" / "keel" / "files"


def served_metric_names() -> set[str]:
    import numpy as np

    import pandas as pd

    from keel.data.transform import ReferenceBins

    reference = ReferenceBins.of_categories(pd.Series(["a", "b"]), categories=["a", "b"])
    metrics = ServingMetrics("m", "1", ["a", "b"], prediction_reference=reference)
    metrics.observe_request("/v1/models/m:predict", 200, 0.01)
    metrics.observe_batch(3)
    metrics.observe_predictions(np.tile([[0.2, 0.8]], (200, 1)))  # enough for the prediction drift score
    metrics.observe_sources(["popular"])
    shadow = ShadowMetrics(metrics.registry, "m", "1")  # what a replica with a shadow adds
    shadow.observe_comparison("2", np.asarray(["a", "b"], dtype=object), ["a", "a"], 0.01)
    ranked = np.empty(1, dtype=object)
    ranked[:] = [(1, 2)]
    shadow.observe_comparison("2", ranked, [(2, 3)], 0.01)  # a recommender's shadow
    CanaryMetrics(metrics.registry, "m", "1").observe("answered", 0.01)  # and one with a canary
    registry = metrics.registry
    names = set()
    for family in registry.collect():
        names |= {sample.name for sample in family.samples} | {family.name}
    checked = {"model_name": "m", "version": "1", "verdict": "degraded", "rows": 60,
               "metrics": {"f1_macro": 0.7}, "registered": {"f1_macro": 0.9}}
    names |= {family.name for family in verdict_registry(checked).collect()}  # what a check on labels pushes
    names |= {family.name for family in stage_registry("p", "train", {"duration_s": 1.0}).collect()}  # a step
    return names | {"keel_feature_drift_psi"}  # a labelled gauge: exported once inputs arrive (tested in serve)


def tracking_server_metric_names() -> set[str]:
    """What `mlflow server --expose-prometheus` exports: prometheus_flask_exporter's defaults, prefixed as MLflow
    asks (mlflow.server.prometheus_exporter)."""
    from flask import Flask
    from prometheus_client import CollectorRegistry
    from prometheus_flask_exporter import PrometheusMetrics

    registry, app = CollectorRegistry(), Flask("mlflow")
    PrometheusMetrics(app, registry=registry, defaults_prefix="mlflow", path=None)
    app.test_client().get("/api/2.0/mlflow/experiments/search")  # a sample of each series
    return {sample.name for family in registry.collect() for sample in family.samples} | {
        family.name for family in registry.collect()}


def queried_metric_names(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w.])((?:keel|mlflow)_[a-z_]+)\b", text))  # not a module: keel.monitor.mlflow_metrics


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: `make test` installs the Debian package `prometheus` (see .ci/run)")
    return path


def test_rules_are_valid(promtool: str) -> None:
    result = subprocess.run([promtool, "check", "rules", str(MONITOR / "alerts.yaml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 11 rules found" in result.stdout


def test_rules_fire_when_they_should(promtool: str) -> None:
    result = subprocess.run([promtool, "test", "rules", "alerts_test.yaml"], cwd=MONITOR, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_and_dashboard_query_only_metrics_the_server_exports() -> None:
    exported = served_metric_names() | tracking_server_metric_names()
    for name in ("alerts.yaml", "grafana-dashboard.json"):
        queried = queried_metric_names((MONITOR / name).read_text())
        assert queried and queried <= exported, f"{name} queries unknown metrics {queried - exported}"


def test_dashboard_is_grafana_json() -> None:
    dashboard = json.loads((MONITOR / "grafana-dashboard.json").read_text())
    assert dashboard["uid"] == "keel-serving" and len(dashboard["panels"]) >= 5
    assert all(panel["targets"] and panel["datasource"]["type"] == "prometheus" for panel in dashboard["panels"])
