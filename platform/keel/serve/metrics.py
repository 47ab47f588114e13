"""Serving metrics in Prometheus conventions: ``_total`` counters, ``_seconds`` histograms.

Labels are bounded: model, version, route template and status code; the
predicted class; a recommender's source (personalized or popular). No request
ids or raw values become labels.
"""

from __future__ import annotations

import collections

import numpy as np
import pandas as pd
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from keel.data.transform import ReferenceBins
from keel.monitor.drift import DriftMonitor

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)
PREDICTED = "predicted class"


def route_of(path: str) -> str:
    """The route template a path belongs to, so paths never explode the label set. A V1 readiness probe
    (``GET /v1/models/NAME``) is a route of its own: counted as ``:predict`` it would pass for traffic."""
    if path.startswith("/v1/models/"):
        verb = path.rpartition(":")[2] if ":" in path else ""
        return "/v1/models/{name}" + (f":{verb}" if verb in ("predict", "recommend", "classify") else "")
    if path in ("/v1/models", "/v2"):  # the V1 model list, the V2 server metadata
        return path
    for prefix, route in (("/v2/models/", "/v2/models/{name}"),
                          ("/v2/health/", "/v2/health"), ("/docs", "/docs"), ("/openapi.json", "/openapi.json")):
        if path.startswith(prefix):
            return route + ("/infer" if route.startswith("/v2/models") and path.endswith("/infer") else "")
    return "other"


class ServingMetrics:
    """One model's metrics, in a registry of its own (tests and replicas never collide)."""

    def __init__(self, model: str, version: str, classes: list[str],
                 reference: dict[str, ReferenceBins] | None = None, registry: CollectorRegistry | None = None,
                 prediction_reference: ReferenceBins | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._labels = {"model": model, "version": version}
        self._class_names = list(classes)
        self.requests = Counter("keel_requests_total", "HTTP requests by route and status code.",
                                ["model", "version", "route", "code"], registry=self.registry)
        self.latency = Histogram("keel_request_duration_seconds", "Request latency, end to end in the server.",
                                 ["model", "version", "route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("keel_batch_size", "Rows scored per model call (after dynamic batching).",
                                    ["model", "version"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.predictions = Counter("keel_predictions_total", "Predicted rows by class.",
                                   ["model", "version", "class_name"], registry=self.registry)
        self.recommendations = Counter("keel_recommendations_total",
                                       "Users answered by a recommender, by source: personalized (a user the model "
                                       "knows) or popular (an unknown user, given the popular list).",
                                       ["model", "version", "source"], registry=self.registry)
        self.drift = Gauge("keel_feature_drift_psi", "PSI of recent inputs against the training data, per column.",
                           ["model", "version", "feature"], registry=self.registry)
        self._drift_monitor = DriftMonitor(reference or {})
        self.prediction_drift = Gauge("keel_prediction_drift_psi",
                                      "PSI of recent predicted classes against the model's predictions on its test "
                                      "split (exported once it has predicted, for models registered with them).",
                                      ["model", "version"], registry=self.registry)
        self._prediction_monitor = DriftMonitor({PREDICTED: prediction_reference} if prediction_reference else {})
        info = Gauge("keel_model_info", "The model being served (value 1).", ["model", "version"],
                     registry=self.registry)
        info.labels(**self._labels).set(1)
        for name in classes:  # zero-initialised series, so rate() works from the first scrape
            self.predictions.labels(**self._labels, class_name=name)

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        route = route_of(path)
        self.requests.labels(**self._labels, route=route, code=str(status)).inc()
        self.latency.labels(**self._labels, route=route).observe(seconds)

    def observe_batch(self, rows: int) -> None:
        self.batch_size.labels(**self._labels).observe(rows)

    def observe_predictions(self, probabilities: np.ndarray) -> None:
        predicted = probabilities.argmax(axis=1)
        counts = np.bincount(predicted, minlength=len(self._class_names))
        for name, count in zip(self._class_names, counts, strict=True):
            if count:
                self.predictions.labels(**self._labels, class_name=name).inc(int(count))
        self._observe_drift_of(np.asarray(self._class_names, dtype=object)[predicted])

    def _observe_drift_of(self, predicted: np.ndarray) -> None:
        if self._prediction_monitor.reference:
            self._prediction_monitor.observe(pd.DataFrame({PREDICTED: predicted}))
            for score in self._prediction_monitor.scores().values():  # none before enough predictions
                self.prediction_drift.labels(**self._labels).set(score)

    def serves(self, route: str) -> None:
        """Start the model's scoring route at zero requests, so a model nobody ever calls has a series for
        the no-traffic alert to see (counters appear only once incremented otherwise)."""
        self.requests.labels(**self._labels, route=route, code="200")

    def observe_labels(self, labels: list[str]) -> None:
        """Predicted classes given by name (a text classifier's intents)."""
        for name, count in collections.Counter(labels).items():
            self.predictions.labels(**self._labels, class_name=name).inc(count)
        self._observe_drift_of(np.asarray(labels, dtype=object))

    def observe_sources(self, sources: list[str]) -> None:
        for source, count in collections.Counter(sources).items():
            self.recommendations.labels(**self._labels, source=source).inc(count)

    def observe_inputs(self, frame: pd.DataFrame) -> None:
        self._drift_monitor.observe(frame)
        for feature, score in self._drift_monitor.scores().items():
            self.drift.labels(**self._labels, feature=feature).set(score)
