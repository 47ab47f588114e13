import numpy as np
import pytest
from kfp.dsl import ClassificationMetrics, Metrics

from keel.evaluate import classification_metrics, emit_kfp_metrics


def test_binary_metrics_match_a_hand_count() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    probabilities = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    report = classification_metrics(labels, probabilities, ["no", "yes"])
    assert report["accuracy"] == pytest.approx(3 / 5)
    assert report["confusion_matrix"] == [[1, 1], [1, 2]]
    assert report["precision_macro"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert report["roc_auc"] == pytest.approx(5 / 6)
    curve = report["roc_curve"]
    assert curve["fpr"][0] == 0 and curve["tpr"][-1] == 1 and max(curve["thresholds"]) <= 1


def test_multiclass_uses_one_vs_rest_auc() -> None:
    labels = np.array([0, 1, 2, 0, 1, 2])
    probabilities = np.eye(3)[labels] * 0.9 + 0.1 / 3
    report = classification_metrics(labels, probabilities, ["a", "b", "c"])
    assert report["accuracy"] == 1 and report["roc_auc"] == 1 and "roc_curve" not in report


def test_kfp_artifacts_carry_the_metrics(tmp_path) -> None:
    labels = np.array([0, 1, 1, 0])
    report = classification_metrics(labels, np.array([[0.8, 0.2], [0.3, 0.7], [0.1, 0.9], [0.6, 0.4]]), ["n", "p"])
    metrics = Metrics(name="metrics", uri=str(tmp_path / "m"))
    classification = ClassificationMetrics(name="cm", uri=str(tmp_path / "c"))
    emit_kfp_metrics(report, metrics, classification)
    assert metrics.metadata["accuracy"] == 1.0 and metrics.metadata["f1_macro"] == 1.0
    matrix = classification.metadata["confusionMatrix"]
    assert [c["displayName"] for c in matrix["annotationSpecs"]] == ["n", "p"]
    assert matrix["rows"] == [{"row": [2, 0]}, {"row": [0, 2]}]
    assert classification.metadata["confidenceMetrics"]
