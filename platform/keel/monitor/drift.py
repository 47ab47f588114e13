"""Population stability index (PSI) of live inputs against the training distribution.

The reference bins (a numeric column's deciles, a categorical column's
categories and an unseen-value bin) travel with the model
(``transform.json``); the server keeps the bin of each of the last ``window``
rows per column and recomputes PSI per batch. PSI above 0.2 is the usual sign
of a shifted input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from keel.data.transform import ReferenceBins

EPSILON = 1e-4
# PSI over few rows is mostly sampling noise: rows drawn from the reference itself score 1.07 on average over
# deciles at 20 rows and 0.22 at 50, over the 0.2 alert line, and 0.05 at 200. So a column's score waits for
# 20 rows per bin (200 at least).
ROWS_PER_BIN, MIN_ROWS = 20, 200
# Beside a registered classifier: the shares of each class it predicted on its test split, what the server
# compares its recent predictions with (prediction drift). Models registered before it have none.
PREDICTION_REFERENCE_FILE = "prediction_reference.json"


def write_prediction_reference(directory: Path, predicted: pd.Series, classes: list[str]) -> ReferenceBins:
    """Save the shares of ``classes`` among a model's held-out ``predicted`` labels beside the model."""
    reference = ReferenceBins.of_categories(predicted, categories=classes)
    (directory / PREDICTION_REFERENCE_FILE).write_text(reference.model_dump_json())
    return reference


def read_prediction_reference(directory: Path) -> ReferenceBins | None:
    path = directory / PREDICTION_REFERENCE_FILE
    return ReferenceBins.model_validate_json(path.read_text()) if path.exists() else None


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """sum((a - e) * ln(a / e)) over bins, with empty bins floored at EPSILON."""
    e = np.clip(expected, EPSILON, None)
    a = np.clip(actual, EPSILON, None)
    return float(np.sum((a - e) * np.log(a / e)))


class DriftMonitor:
    """A sliding window of recent rows' bins per column."""

    def __init__(self, reference: dict[str, ReferenceBins], window: int = 2000) -> None:
        self.reference = {name: bins for name, bins in reference.items() if bins.usable}
        self.window = window
        self._bins = {name: np.full(window, -1, dtype=np.int32) for name in self.reference}
        self._next = 0
        self._filled = 0

    def observe(self, frame: pd.DataFrame) -> None:
        rows = min(len(frame), self.window)
        positions = (self._next + np.arange(rows)) % self.window
        for name, bins in self.reference.items():
            self._bins[name][positions] = bins.bin_indexes(frame[name].tail(rows))
        self._next = (self._next + rows) % self.window
        self._filled = min(self._filled + rows, self.window)

    def rows_needed(self, bins: ReferenceBins) -> int:
        """Rows (not missing) a column's PSI waits for, so that no drift at all scores well under 0.2."""
        return min(self.window, max(MIN_ROWS, ROWS_PER_BIN * len(bins.fractions)))

    def scores(self) -> dict[str, float]:
        """PSI per column over the current window, for the columns that have :meth:`rows_needed` values."""
        result = {}
        for name, bins in self.reference.items():
            seen = self._bins[name][:self._filled] if self._filled < self.window else self._bins[name]
            seen = seen[seen >= 0]
            if len(seen) >= self.rows_needed(bins):
                actual = np.bincount(seen, minlength=len(bins.fractions)) / len(seen)
                result[name] = psi(np.asarray(bins.fractions), actual)
        return result
