"""Push a finished stage's figures to a Prometheus Pushgateway (when ``KEEL_PUSHGATEWAY_URL`` is set).

Pipeline steps are batch jobs that end before any scrape, so they push:
duration, rows and, for evaluation, the test metrics, grouped by pipeline and
stage so each run replaces the previous run's values.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

from keel.evaluate import HEADLINE_METRICS


def stage_registry(pipeline: str, stage: str, manifest: dict[str, Any]) -> CollectorRegistry:
    registry = CollectorRegistry()
    labels = {"pipeline": pipeline, "stage": stage}
    Gauge("keel_stage_duration_seconds", "A pipeline stage's own compute time.", list(labels),
          registry=registry).labels(**labels).set(float(manifest.get("duration_s", 0)))
    rows = manifest.get("rows")
    if isinstance(rows, dict):
        rows = sum(rows.values())
    if isinstance(rows, int | float):
        Gauge("keel_stage_rows", "Rows a pipeline stage produced or scored.", list(labels),
              registry=registry).labels(**labels).set(rows)
    evaluation = {k: manifest[k] for k in HEADLINE_METRICS if isinstance(manifest.get(k), int | float)}
    if evaluation:
        gauge = Gauge("keel_evaluation_metric", "Test-split metrics of the latest evaluated model.",
                      ["pipeline", "metric"], registry=registry)
        for name, value in evaluation.items():
            gauge.labels(pipeline=pipeline, metric=name).set(value)
    return registry


def push_stage_metrics(gateway: str, pipeline: str, stage: str, manifest: dict[str, Any]) -> None:
    push_to_gateway(gateway, job="keel_pipeline", grouping_key={"pipeline": pipeline, "stage": stage},
                    registry=stage_registry(pipeline, stage, manifest), timeout=10)
