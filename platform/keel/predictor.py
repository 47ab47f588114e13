"""Scoring raw rows: the feature transform, then the network.

Evaluation, the MLflow pyfunc and serving all go through :class:`Predictor`,
so the score a model is promoted on is the score of what users call.
"""

from __future__ import annotations

from pathlib import Path
import numpy as np
import pandas as pd
import torch

from keel.data.preprocess import TRANSFORM_FILE
from keel.data.transform import FeatureTransform, ReferenceBins
from keel.monitor.drift import read_prediction_reference, write_prediction_reference
from keel.tracking import PROBABILITY_PREFIX
from torch import nn

from keel.train.model import load_model

PREDICTION_COLUMN = "prediction"


class Predictor:
    """A trained network with the transform it was trained behind."""

    def __init__(self, model: nn.Module, transform: FeatureTransform,
                 prediction_reference: ReferenceBins | None = None) -> None:
        self.model = model.eval()
        self.transform = transform
        self.prediction_reference = prediction_reference

    @classmethod
    def load(cls, directory: Path) -> Predictor:
        """Load a published model directory (``model.pt``, ``model.json``, ``transform.json``, and
        ``prediction_reference.json`` once registered)."""
        return cls(load_model(directory), FeatureTransform.load(directory / TRANSFORM_FILE),
                   read_prediction_reference(directory))

    def write_prediction_reference(self, directory: Path, held_out: pd.DataFrame) -> ReferenceBins:
        """The shares of each class this model predicts for ``held_out`` rows, saved beside the model."""
        predicted = self.predict(held_out)[PREDICTION_COLUMN]
        self.prediction_reference = write_prediction_reference(directory, predicted, self.classes)
        return self.prediction_reference

    @property
    def classes(self) -> list[str]:
        return self.transform.classes

    @torch.no_grad()
    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        features = torch.from_numpy(self.transform.transform(frame))
        return torch.softmax(self.model(features), dim=1).numpy()

    def labels(self, probabilities: np.ndarray) -> np.ndarray:
        """The predicted class of each row of ``predict_proba``'s output."""
        return np.asarray(self.classes, dtype=object)[probabilities.argmax(axis=1)]

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """One row per input: the predicted label and a probability column per class."""
        probabilities = self.predict_proba(frame)
        result = pd.DataFrame(probabilities, columns=[f"{PROBABILITY_PREFIX}{c}" for c in self.classes])
        result.insert(0, PREDICTION_COLUMN, self.labels(probabilities))
        return result
