"""Evaluate: score the held-out test rows through the same path serving uses.

The model is fed the raw test columns (transform + network, as the MLflow
pyfunc does), so the reported metrics cover preprocessing too.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from keel import storage
from keel.settings import KeelSettings

EVALUATION_FILE = "evaluation.json"
HEADLINE_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "roc_auc")
ROC_POINTS = 50


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1, ROC-AUC, confusion matrix and (binary) ROC curve."""
    from sklearn import metrics

    predicted = probabilities.argmax(axis=1)
    everything = list(range(len(classes)))
    report: dict[str, Any] = {
        "accuracy": float(metrics.accuracy_score(labels, predicted)),
        "precision_macro": float(metrics.precision_score(labels, predicted, average="macro", zero_division=0)),
        "recall_macro": float(metrics.recall_score(labels, predicted, average="macro", zero_division=0)),
        "f1_macro": float(metrics.f1_score(labels, predicted, average="macro", zero_division=0)),
        "confusion_matrix": metrics.confusion_matrix(labels, predicted, labels=everything).tolist(),
        "classes": classes,
        "rows": int(len(labels)),
    }
    if len(np.unique(labels)) < 2:
        report["roc_auc"] = float("nan")
    elif len(classes) == 2:
        report["roc_auc"] = float(metrics.roc_auc_score(labels, probabilities[:, 1]))
        fpr, tpr, thresholds = metrics.roc_curve(labels, probabilities[:, 1])
        keep = np.unique(np.linspace(0, len(fpr) - 1, min(ROC_POINTS, len(fpr))).astype(int))
        # sklearn's first threshold is +inf, which JSON and KFP cannot carry
        report["roc_curve"] = {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist(),
                               "thresholds": np.minimum(thresholds[keep], 1.0).tolist(),
                               "positive_class": classes[1]}
    else:
        report["roc_auc"] = float(metrics.roc_auc_score(labels, probabilities, multi_class="ovr",
                                                        average="macro", labels=everything))
    return report


def evaluate(model_uri: str, splits_uri: str, output_uri: str, settings: KeelSettings) -> dict[str, Any]:
    """Score the published model at ``model_uri`` on the raw test split; publish ``evaluation.json``."""
    from keel.predictor import Predictor  # torch: only where a model is scored

    with storage.staged_output(output_uri, "evaluate", settings) as out, \
            tempfile.TemporaryDirectory(prefix="keel-evaluate-") as scratch:
        splits = storage.read_manifest(splits_uri, settings)
        raw_test = storage.read_parquet(splits["raw_test"], settings)
        predictor = Predictor.load(storage.download_directory(model_uri, Path(scratch) / "model", settings))
        labels = predictor.transform.encode_labels(raw_test[predictor.transform.target])
        report = classification_metrics(labels, predictor.predict_proba(raw_test), predictor.classes)
        out.write_json(EVALUATION_FILE, report)
        out.manifest.update({name: report[name] for name in HEADLINE_METRICS},
                            evaluation=out.uri_of(EVALUATION_FILE), rows=report["rows"])
    return report


def emit_kfp_metrics(report: dict[str, Any], metrics: Any, classification: Any) -> None:
    """Fill KFP ``Metrics`` and ``ClassificationMetrics`` artifacts so the Kubeflow UI shows them."""
    for name in HEADLINE_METRICS:
        if np.isfinite(report[name]):
            metrics.log_metric(name, round(float(report[name]), 6))
    classification.log_confusion_matrix(report["classes"], report["confusion_matrix"])
    if "roc_curve" in report:
        curve = report["roc_curve"]
        classification.log_roc_curve(curve["fpr"], curve["tpr"], curve["thresholds"])
