from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st

from keel import storage
from keel.data.contract import DataContract
from keel.data.ingest import ingest
from keel.data.preprocess import LABEL, PreprocessConfig, preprocess, stratified_split
from keel.data.transform import FeatureTransform
from keel.errors import DataError
from keel.settings import KeelSettings
from tests.conftest import small_frame


def test_split_is_stratified_and_disjoint() -> None:
    frame = small_frame(400)
    splits = stratified_split(frame, "outcome", PreprocessConfig(val_fraction=0.2, test_fraction=0.2))
    overall = (frame["outcome"] == "yes").mean()
    for split in splits.values():
        assert abs((split["outcome"] == "yes").mean() - overall) < 0.03
    indexes = [set(s.index) for s in splits.values()]
    assert sum(map(len, indexes)) == 400 and not (indexes[0] & indexes[1] or indexes[1] & indexes[2])


def test_split_needs_rows_in_every_class() -> None:
    frame = small_frame(40)
    frame.loc[0, "outcome"] = "rare"
    with pytest.raises(DataError, match="column 'outcome': cannot split"):
        stratified_split(frame, "outcome", PreprocessConfig())


def test_config_must_leave_training_rows() -> None:
    with pytest.raises(ValueError, match="at least 10%"):
        PreprocessConfig(val_fraction=0.5, test_fraction=0.45)


def test_transform_standardizes_imputes_and_one_hot_encodes(make_contract: Callable[..., DataContract]) -> None:
    train = small_frame(200)
    transform = FeatureTransform.fit(train, make_contract())
    features = transform.transform(train)
    size = features[:, transform.feature_names.index("size")]
    assert abs(size.mean()) < 1e-5 and abs(size.std() - 1) < 1e-3
    assert {"colour=red", "colour=green", "colour=blue"} <= set(transform.feature_names)
    unseen = train.head(2).assign(colour=["purple", None], weight=[np.nan, np.nan])
    encoded = transform.transform(unseen)
    one_hot = [transform.feature_names.index(f"colour={c}") for c in ("blue", "green", "red")]
    assert encoded[0, one_hot].sum() == 0  # unseen category: all zeros
    assert encoded[1, one_hot].sum() == 1  # missing: the mode
    weight = transform.numeric["weight"]
    assert np.allclose(encoded[:, 1], (weight.median - weight.mean) / weight.std)


def test_transform_names_missing_and_non_numeric_columns(make_contract: Callable[..., DataContract]) -> None:
    transform = FeatureTransform.fit(small_frame(50), make_contract())
    with pytest.raises(DataError, match=r"missing column\(s\) \['size'\]"):
        transform.transform(small_frame(5).drop(columns=["size"]))
    with pytest.raises(DataError, match="column 'size': 1 value"):
        transform.transform(small_frame(5).astype({"size": object}).assign(size=["x", 1, 2, 3, 4]))


def test_transform_survives_json(tmp_path: Path, make_contract: Callable[..., DataContract]) -> None:
    frame = small_frame(60)
    transform = FeatureTransform.fit(frame, make_contract())
    transform.save(tmp_path / "t.json")
    assert np.array_equal(FeatureTransform.load(tmp_path / "t.json").transform(frame), transform.transform(frame))


@hypothesis_settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.one_of(st.none(), st.floats(0, 100, allow_nan=False)), min_size=4, max_size=40))
def test_transform_output_is_always_finite(sizes: list) -> None:
    from keel.data.contract import parse_contract
    from tests.conftest import SMALL_CONTRACT

    frame = pd.DataFrame({"size": sizes, "weight": 1.0, "colour": "red", "outcome": "yes"})
    features = FeatureTransform.fit(frame, parse_contract(SMALL_CONTRACT, "test")).transform(frame)
    assert features.shape == (len(sizes), 3) and np.isfinite(features).all()  # size, weight, colour=red


def test_preprocess_stage_outputs(write_table: Callable[..., Path], settings: KeelSettings,
                                  make_contract: Callable[..., DataContract]) -> None:
    frame = small_frame(200)
    frame = pd.concat([frame, frame.head(10)], ignore_index=True)  # 10 duplicates
    dataset = storage.stage_uri(settings, "r1", "ingest")
    ingest(str(write_table(frame)), dataset, settings)
    output = storage.stage_uri(settings, "r1", "preprocess")
    manifest = preprocess(dataset, make_contract(), PreprocessConfig(seed=7), output, settings)
    assert manifest["duplicates_dropped"] == 10 and sum(manifest["rows"].values()) == 200
    train = pd.read_parquet(Path(output) / "train.parquet")
    assert train[LABEL].isin([0, 1]).all() and train.drop(columns=[LABEL]).dtypes.eq(np.float32).all()
    raw_test = pd.read_parquet(Path(output) / "test_raw.parquet")
    assert list(raw_test.columns) == list(frame.columns) and len(raw_test) == manifest["rows"]["test"]
