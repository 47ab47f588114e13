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
