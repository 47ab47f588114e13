import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from keel.data.transform import ReferenceBins
from keel.monitor.drift import DriftMonitor, psi


def test_psi_is_zero_for_identical_and_grows_with_shift() -> None:
    expected = np.full(10, 0.1)
    assert psi(expected, expected) == pytest.approx(0)
    mild = psi(expected, np.array([0.12] * 5 + [0.08] * 5))
    strong = psi(expected, np.array([0.5, 0.5] + [0.0] * 8))
    assert 0 < mild < 0.1 < 0.2 < strong


def test_reference_bins_hold_deciles() -> None:
    bins = ReferenceBins.of(pd.Series(np.arange(1000, dtype=float)))
    assert len(bins.edges) == 9 and np.allclose(bins.fractions, 0.1, atol=0.002)


def test_monitor_sees_a_shifted_column_and_not_a_stable_one() -> None:
    rng = np.random.default_rng(0)
    train = pd.DataFrame({"stable": rng.normal(0, 1, 5000), "shifted": rng.normal(0, 1, 5000)})
    monitor = DriftMonitor({c: ReferenceBins.of(train[c]) for c in train}, window=1000)
    assert monitor.scores() == {}
    live = pd.DataFrame({"stable": rng.normal(0, 1, 1500), "shifted": rng.normal(1.5, 1, 1500)})
    for start in range(0, 1500, 100):  # batches, wrapping the window
        monitor.observe(live.iloc[start:start + 100])
    scores = monitor.scores()
    assert scores["stable"] < 0.05 and scores["shifted"] > 0.5


def test_missing_values_are_not_drift() -> None:
    monitor = DriftMonitor({"x": ReferenceBins.of(pd.Series(np.arange(100, dtype=float)))}, window=50)
    monitor.observe(pd.DataFrame({"x": [np.nan] * 10}))
    assert monitor.scores() == {}


def test_a_renamed_category_shows_as_drift_and_the_same_mix_does_not() -> None:
    rng = np.random.default_rng(1)
    train = pd.Series(rng.choice(["asymptomatic", "atypical", "typical"], 3000, p=[0.5, 0.3, 0.2]))
    reference = ReferenceBins.of_categories(train)
    assert reference.categories == ["asymptomatic", "atypical", "typical"]
    assert reference.fractions[-1] == 0 and np.allclose(reference.fractions[:3], [0.5, 0.3, 0.2], atol=0.03)

    same_mix = DriftMonitor({"chest_pain": reference}, window=1000)
    same_mix.observe(pd.DataFrame({"chest_pain": rng.choice(["asymptomatic", "atypical", "typical"], 1000,
                                                            p=[0.5, 0.3, 0.2])}))
    assert same_mix.scores()["chest_pain"] < 0.02

    # upstream starts sending "Typical" for "typical": the one-hot encodes it as all zeros without an error
    renamed = DriftMonitor({"chest_pain": reference}, window=1000)
    live = pd.Series(rng.choice(["asymptomatic", "atypical", "Typical"], 1000, p=[0.5, 0.3, 0.2]))
    renamed.observe(pd.DataFrame({"chest_pain": live.where(rng.random(1000) > 0.1)}))  # and some missing
    assert renamed.scores()["chest_pain"] > 1.0


def test_the_transform_keeps_a_reference_per_column_and_reads_one_saved_without_categories(tmp_path: Path) -> None:
    from keel.data.contract import DataContract
    from keel.data.transform import FeatureTransform

    frame = pd.DataFrame({"age": [40.0, 50.0, 60.0, None], "sex": ["f", "m", None, "f"], "y": ["0", "1", "0", "1"]})
    contract = DataContract.model_validate({"name": "t", "target": "y", "columns": {
        "age": {"dtype": "float"}, "sex": {"dtype": "category", "nullable": True},
        "y": {"dtype": "category"}}})
    transform = FeatureTransform.fit(frame, contract)
    assert transform.reference["sex"].categories == ["f", "m"]
    assert transform.reference["sex"].fractions == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert transform.reference["age"].categories is None and transform.reference["age"].edges

    saved = transform.model_dump(mode="json")
    saved["reference"] = {"age": {"edges": [45.0, 55.0], "fractions": [1 / 3, 1 / 3, 1 / 3]}}  # before categories
    path = tmp_path / "transform.json"
    path.write_text(json.dumps(saved))
    old = FeatureTransform.load(path)
    assert list(DriftMonitor(old.reference).reference) == ["age"]


def test_predicted_classes_drift_when_their_shares_move_from_the_test_splits() -> None:
    from keel.serve.metrics import ServingMetrics

    # on its test split the model predicted "benign" for 90 of 100 rows and never predicted "unsure"
    reference = ReferenceBins.of_categories(pd.Series(["benign"] * 90 + ["malignant"] * 10),
                                            categories=["benign", "malignant", "unsure"])
    assert reference.categories == ["benign", "malignant", "unsure"]
    assert reference.fractions == pytest.approx([0.9, 0.1, 0.0, 0.0])

    def served(shares: list[float]) -> float:
        metrics = ServingMetrics("m", "3", ["benign", "malignant", "unsure"], prediction_reference=reference)
        for _ in range(10):  # ten requests of 50 rows, each row's most likely class drawn in these shares
            picks = np.random.default_rng(len(shares)).choice(3, size=50, p=shares)
            metrics.observe_predictions(np.eye(3)[picks])
        return metrics.registry.get_sample_value("keel_prediction_drift_psi", {"model": "m", "version": "3"})

    assert served([0.9, 0.1, 0.0]) < 0.05
    assert served([0.5, 0.5, 0.0]) > 0.2  # the rare class five times as often: the alert's threshold
    legacy = ServingMetrics("m", "1", ["benign", "malignant"])  # registered before the reference existed
    legacy.observe_predictions(np.array([[0.1, 0.9]]))
    assert legacy.registry.get_sample_value("keel_prediction_drift_psi", {"model": "m", "version": "1"}) is None


def test_a_column_with_too_few_rows_gets_no_score_rather_than_noise_over_the_alert_line() -> None:
    rng = np.random.default_rng(3)
    reference = ReferenceBins.of(pd.Series(rng.normal(0, 1, 5000)))
    monitor = DriftMonitor({"x": reference}, window=2000)
    live = pd.Series(rng.normal(0, 1, 20))  # the same distribution, 20 rows
    monitor.observe(pd.DataFrame({"x": live}))
    few = np.bincount(reference.bin_indexes(live), minlength=len(reference.fractions)) / 20
    assert psi(np.asarray(reference.fractions), few) > 0.2  # what would have been exported: a false alarm
    assert monitor.scores() == {}
    monitor.observe(pd.DataFrame({"x": rng.normal(0, 1, 180)}))
    assert monitor.rows_needed(reference) == 200 and monitor.scores()["x"] < 0.1
