"""Push a finished stage's figures to a Prometheus Pushgateway (when ``KEEL_PUSHGATEWAY_URL`` is set).

Pipeline steps are batch jobs that end before any scrape, so they push:
duration, rows and, for evaluation, the test metrics, grouped by pipeline and
stage so each run replaces the previous run's values. Each push also says
whether the stage's latest attempt failed and when it last succeeded, as
Prometheus advises for batch jobs: a scheduled pipeline that keeps failing
raises an alert, and one that stopped running at all (a pod killed before it
could push) shows as a last success that is getting old.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, pushadd_to_gateway

from keel.evaluate import HEADLINE_METRICS

JOB = "keel_pipeline"


def stage_registry(pipeline: str, stage: str, manifest: dict[str, Any]) -> CollectorRegistry:
    registry = CollectorRegistry()
    labels = {"pipeline": pipeline, "stage": stage}
    _failed_gauge(registry, labels).set(0)
    Gauge("keel_stage_last_success_timestamp_seconds", "When a pipeline stage last succeeded (Unix time).",
          list(labels), registry=registry).labels(**labels).set(time.time())
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


def _failed_gauge(registry: CollectorRegistry, labels: dict[str, str]) -> Gauge:
    return Gauge("keel_stage_failed", "1 when a pipeline stage's latest attempt failed, 0 when it succeeded.",
                 list(labels), registry=registry).labels(**labels)


def push_stage_metrics(gateway: str, pipeline: str, stage: str, manifest: dict[str, Any]) -> None:
    """A success replaces the stage's group whole: figures of an earlier run never mix with this one's."""
    push_to_gateway(gateway, job=JOB, grouping_key={"pipeline": pipeline, "stage": stage},
                    registry=stage_registry(pipeline, stage, manifest), timeout=10)


def push_stage_failure(gateway: str, pipeline: str, stage: str) -> None:
    """Only ``keel_stage_failed`` changes (a POST replaces the metrics it names): the group keeps the figures
    and the time of the stage's last success."""
    registry = CollectorRegistry()
    _failed_gauge(registry, {"pipeline": pipeline, "stage": stage}).set(1)
    pushadd_to_gateway(gateway, job=JOB, grouping_key={"pipeline": pipeline, "stage": stage}, registry=registry,
                       timeout=10)
