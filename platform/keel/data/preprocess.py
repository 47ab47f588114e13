"""Preprocess: de-duplicate, split with stratification, fit the feature transform on train only.

Outputs: ``train``/``val``/``test`` feature tables (float32 features plus an
integer ``label``), the raw test rows (for scoring through the exact serving
path), and ``transform.json``, which travels with the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from keel import storage
from keel.data.contract import DataContract
from keel.data.ingest import DATA_FILE
from keel.data.transform import FeatureTransform
from keel.errors import DataError
from keel.settings import KeelSettings

SPLITS = ("train", "val", "test")
LABEL = "label"
TRANSFORM_FILE = "transform.json"
RAW_TEST_FILE = "test_raw.parquet"


class PreprocessConfig(BaseModel):
    """How to split; fractions are of the de-duplicated rows."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    val_fraction: float = Field(default=0.15, gt=0, lt=1)
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    seed: int = 42
    drop_duplicates: bool = True

    @model_validator(mode="after")
    def _leaves_training_rows(self) -> PreprocessConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% of rows for training")
        return self


def stratified_split(frame: pd.DataFrame, target: str, config: PreprocessConfig) -> dict[str, pd.DataFrame]:
    """Train/val/test with every class in the same proportion in each split."""
    from sklearn.model_selection import train_test_split

    try:
        rest, test = train_test_split(frame, test_size=config.test_fraction, random_state=config.seed,
                                      stratify=frame[target])
        val_share = config.val_fraction / (1 - config.test_fraction)
        train, val = train_test_split(rest, test_size=val_share, random_state=config.seed, stratify=rest[target])
    except ValueError as e:
        counts = frame[target].value_counts().to_dict()
        raise DataError(f"column {target!r}: cannot split with stratification ({e}); class counts {counts}. "
                        "Each class needs a few rows in every split.") from e
    return {"train": train, "val": val, "test": test}


def feature_table(frame: pd.DataFrame, transform: FeatureTransform) -> pd.DataFrame:
    features = pd.DataFrame(transform.transform(frame), columns=transform.feature_names, index=frame.index)
    features[LABEL] = transform.encode_labels(frame[transform.target])
    return features.reset_index(drop=True)


def feature_matrix(frame: pd.DataFrame, feature_names: list[str]) -> np.ndarray:
    """A split's features as one row-major float32 array, for training that gathers rows at every step: pandas
    hands a Parquet or Arrow table's columns over column-major, and a row gather from that is several times
    slower."""
    return np.ascontiguousarray(frame[feature_names].to_numpy(dtype=np.float32))


def preprocess(dataset_uri: str, contract: DataContract, config: PreprocessConfig, output_uri: str,
               settings: KeelSettings) -> dict[str, Any]:
    """Turn the validated table at ``dataset_uri`` into model-ready splits at ``output_uri``."""
    with storage.staged_output(output_uri, "preprocess", settings) as out:
        raw = storage.read_parquet(storage.join(dataset_uri, DATA_FILE), settings)
        frame = raw[[c for c in raw.columns if c in contract.columns]]
        frame = frame[frame[contract.target].notna()]
        duplicates = int(frame.duplicated().sum())
        if config.drop_duplicates:
            frame = frame.drop_duplicates()
        splits = stratified_split(frame, contract.target, config)
        transform = FeatureTransform.fit(splits["train"], contract)
        for name, split in splits.items():
            feature_table(split, transform).to_parquet(out.path(f"{name}.parquet"), index=False)
        splits["test"].reset_index(drop=True).to_parquet(out.path(RAW_TEST_FILE), index=False)
        transform.save(out.path(TRANSFORM_FILE))
        out.manifest.update(
            rows={name: len(split) for name, split in splits.items()},
            duplicates_dropped=duplicates if config.drop_duplicates else 0,
            features=len(transform.feature_names),
            classes=transform.classes,
            splits={name: out.uri_of(f"{name}.parquet") for name in SPLITS},
            transform=out.uri_of(TRANSFORM_FILE),
            raw_test=out.uri_of(RAW_TEST_FILE),
            seed=config.seed,
        )
    return out.manifest
