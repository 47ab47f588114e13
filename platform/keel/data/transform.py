"""The fitted feature transform that travels with every model.

Training and serving call the same :meth:`FeatureTransform.transform` on raw
columns, and the fitted state is plain JSON (no pickles), so there is no
train/serve skew and nothing executable is loaded from an artifact.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from keel.data.contract import DataContract
from keel.errors import DataError

FLOAT32_MAX = float(np.finfo(np.float32).max)


class NumericStats(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    median: float
    mean: float
    std: float


class CategoricalStats(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: str
    categories: list[str]


class ReferenceBins(BaseModel):
    """A column's training distribution, for drift (PSI): a numeric column's decile edges, or a categorical
    column's categories plus a last bin for values training never saw (share 0, so a renamed category upstream,
    which the one-hot encoding would silently score as all zeros, shows as drift); each bin's share."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    edges: list[float] = []
    categories: list[str] | None = None
    fractions: list[float]

    @classmethod
    def of(cls, values: pd.Series, bins: int = 10) -> ReferenceBins:
        finite = values[np.isfinite(values)]
        if finite.empty:
            return cls(edges=[], fractions=[1.0])
        edges = np.unique(np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1]))
        counts = np.bincount(np.searchsorted(edges, finite, side="right"), minlength=len(edges) + 1)
        return cls(edges=edges.tolist(), fractions=(counts / counts.sum()).tolist())

    @classmethod
    def of_categories(cls, values: pd.Series, categories: list[str] | None = None) -> ReferenceBins:
        """The values' shares per category: those seen, or every one of ``categories`` (a model's classes,
        some of which it may never have predicted), then the unseen-value bin."""
        shares = values.dropna().astype(str).value_counts(normalize=True).sort_index()
        if categories is not None:
            shares = shares.reindex(categories, fill_value=0.0)
        return cls(categories=shares.index.tolist(), fractions=[*shares.tolist(), 0.0])

    @property
    def usable(self) -> bool:
        return bool(self.edges or self.categories)

    def bin_indexes(self, values: pd.Series) -> np.ndarray:
        """Each value's bin; -1 for a missing value (not drift) or, in a numeric column, a non-number."""
        if self.categories is None:
            numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
            indexes = np.searchsorted(np.asarray(self.edges), numbers, side="right").astype(np.int32)
            indexes[~np.isfinite(numbers)] = -1
            return indexes
        missing = values.isna().to_numpy()
        codes = pd.Categorical(values.astype(str), categories=self.categories).codes.astype(np.int32)
        codes[codes < 0] = len(self.categories)
        codes[missing] = -1
        return codes


class FeatureTransform(BaseModel):
    """Impute, standardize numeric columns and one-hot encode categorical ones."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    target: str
    classes: list[str]
    numeric: dict[str, NumericStats]
    categorical: dict[str, CategoricalStats]
    reference: dict[str, ReferenceBins] = {}
    # numeric columns the contract types bool (a request may send true/false); None: saved before this was
    # recorded, so any numeric column may be a boolean
    boolean: list[str] | None = None

    @property
    def input_columns(self) -> list[str]:
        return [*self.numeric, *self.categorical]

    @property
    def feature_names(self) -> list[str]:
        one_hot = [f"{name}={c}" for name, stats in self.categorical.items() for c in stats.categories]
        return [*self.numeric, *one_hot]

    @classmethod
    def fit(cls, frame: pd.DataFrame, contract: DataContract) -> FeatureTransform:
        """Learn imputation values, scales and categories from the training split only."""
        numeric, categorical, reference = {}, {}, {}
        for name in [c for c in frame.columns if c in contract.features]:  # the data's column order
            spec = contract.columns[name]
            if spec.is_numeric:
                values = pd.to_numeric(frame[name], errors="coerce").astype(float)
                std = float(values.std(ddof=0)) if values.notna().any() else 0.0
                numeric[name] = NumericStats(
                    median=float(values.median()) if values.notna().any() else 0.0,
                    mean=float(values.mean()) if values.notna().any() else 0.0,
                    std=std if std > 0 and np.isfinite(std) else 1.0,
                )
                reference[name] = ReferenceBins.of(values.dropna())
            else:
                values = frame[name].dropna().astype(str)
                categories = sorted(values.unique().tolist())
                mode = str(values.mode().iloc[0]) if len(values) else ""
                categorical[name] = CategoricalStats(mode=mode, categories=categories)
                reference[name] = ReferenceBins.of_categories(values)
        classes = sorted(frame[contract.target].astype(str).unique().tolist())
        boolean = [name for name in numeric if contract.columns[name].dtype == "bool"]
        return cls(target=contract.target, classes=classes, numeric=numeric, categorical=categorical,
                   reference=reference, boolean=boolean)

    def may_be_boolean(self, name: str) -> bool:
        return self.boolean is None or name in self.boolean

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """Raw columns to a float32 feature matrix; DataError naming missing or non-numeric columns."""
        missing = [c for c in self.input_columns if c not in frame.columns]
        if missing:
            raise DataError(f"input is missing column(s) {missing}; expected {self.input_columns}.")
        blocks = [self._numeric_block(frame)] if self.numeric else []
        blocks += [self._one_hot(frame[name], stats) for name, stats in self.categorical.items()]
        if not blocks:
            return np.zeros((len(frame), 0), dtype=np.float32)
        return np.hstack(blocks).astype(np.float32, copy=False)

    def _numeric_block(self, frame: pd.DataFrame) -> np.ndarray:
        columns = []
        for name, stats in self.numeric.items():
            raw = frame[name]
            values = pd.to_numeric(raw, errors="coerce").astype(float)
            not_numbers = raw.notna() & values.isna()
            if not_numbers.any():
                raise DataError(f"column {name!r}: {int(not_numbers.sum())} value(s) are not numbers, "
                                f"e.g. {raw[not_numbers].head(3).tolist()}.")
            if np.isinf(values).any():
                raise DataError(f"column {name!r}: infinite values cannot be scored.")
            scaled = ((values.fillna(stats.median) - stats.mean) / stats.std).to_numpy()
            too_large = np.abs(scaled) > FLOAT32_MAX  # would be infinite in the network, and its answer NaN
            if too_large.any():
                raise DataError(f"column {name!r}: {int(too_large.sum())} value(s) are too large to score, e.g. "
                                f"{raw[too_large].head(3).tolist()}; training saw {stats.mean:.4g} +/- "
                                f"{stats.std:.4g}.")
            columns.append(scaled)
        return np.column_stack(columns)

    @staticmethod
    def _one_hot(column: pd.Series, stats: CategoricalStats) -> np.ndarray:
        values = column.where(column.notna(), stats.mode).astype(str).to_numpy()
        # An unseen category encodes as all zeros rather than failing the request.
        return (values[:, None] == np.asarray(stats.categories)[None, :]).astype(np.float32)

    def encode_labels(self, labels: pd.Series) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        as_text = labels.astype(str)
        unknown = sorted(set(as_text) - set(index))
        if unknown:
            raise DataError(f"column {self.target!r}: label(s) {unknown[:5]} were not seen in training.")
        return as_text.map(index).to_numpy(dtype=np.int64)

    def save(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: Path) -> FeatureTransform:
        return cls.model_validate(json.loads(path.read_text()))
