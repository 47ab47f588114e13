"""Drafting a contract from a user's table: it passes the table it came from and says what it left out."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.pandas import column, data_frames, range_indexes

from keel.config import load_pipeline_config
from keel.data.contract import parse_contract
from keel.data.draft import config_snippet, draft_contract
from keel.data.validate import quality_report
from keel.errors import DataError
from tests.conftest import heart_table

MEDICAL_CONFIG = Path(__file__).parents[3] / "pipelines" / "medical_diagnosis" / "config.yaml"


def test_a_draft_types_each_column_as_the_data_shows_and_passes_its_own_table() -> None:
    table = heart_table()
    drafted = draft_contract(table, "target", "heart", "heart.csv")
    columns = drafted.contract.columns
    assert list(columns) == ["age", "sex", "chol", "smoker", "ca", "target"]  # the file's order
    assert (columns["age"].dtype, columns["age"].min, columns["age"].max) == ("int", 24, 82)
    assert columns["sex"].dtype == "category" and columns["sex"].allowed == ["female", "male"]
    assert columns["chol"].dtype == "float" and columns["chol"].nullable and columns["chol"].min >= 0
    assert columns["smoker"].dtype == "bool" and columns["target"].allowed == [0, 1]
    assert drafted.contract.thresholds.max_missing_fraction == 0.1
    assert drafted.left_out == {"patient_id": "an identifier (120 distinct integers)",
                                "notes": "free text or an identifier (120 distinct values)"}
    assert "'?' (4 row(s))" in drafted.notes["ca"] and columns["ca"].dtype == "category"
    assert quality_report(table, drafted.contract)["passed"]
    other = table.assign(admitted=pd.Timestamp("2024-05-01"), bp=[*range(119), "?"], target=table["target"] * 1.0)
    drafted = draft_contract(other, "target", "heart", "heart.parquet")
    assert drafted.left_out["admitted"].startswith("a date-time")
    assert drafted.left_out["bp"] == "numbers but for '?' (1 row(s)); make those cells empty to use it as a number"
    assert drafted.contract.columns["target"].allowed == ["0.0", "1.0"]  # float labels: a category of their texts
    assert quality_report(other, drafted.contract)["passed"]


def test_identifiers_row_numbers_and_dates_written_as_text_are_no_features(tmp_path: Path) -> None:
    """As Kaggle's Titanic and a DataFrame saved with its index have them: kept, an identifier is a feature that
    refuses every later row (its range ends at the last id seen), and a date typed a category every later date."""
    rows = 120
    table = heart_table(rows).drop(columns=["patient_id"]).assign(
        PassengerId=range(1, rows + 1), customerID=[7 * i + 3 for i in range(rows)],
        admitted=pd.date_range("2024-01-01", periods=rows, freq="h").astype(str),
        visit_day=[f"2024-05-0{1 + i % 3}" for i in range(rows)],
        income=[1000 + i * i for i in range(rows)])  # all distinct, no id in its name: a feature
    table.insert(0, "Unnamed: 0", range(rows))
    table.to_csv(tmp_path / "table.csv", index=False)
    drafted = draft_contract(pd.read_csv(tmp_path / "table.csv"), "target", "heart", "table.csv")
    assert drafted.left_out["PassengerId"] == drafted.left_out["customerID"] == "an identifier (120 distinct integers)"
    assert drafted.left_out["Unnamed: 0"] == "row numbers (0 to 119, one per row)"
    assert drafted.left_out["admitted"].startswith("a date-time") and drafted.left_out["visit_day"].startswith(
        "a date-time")
    assert drafted.contract.columns["income"].dtype == "int" and "sex" in drafted.contract.columns


@pytest.mark.parametrize("labels, expected", [
    ([1] * 70 + [0] * 30, "1"),  # the majority, but the 1 of 0/1 labels
    (["No"] * 20 + ["Yes"] * 80, "Yes"),
    ([True] * 60 + [False] * 40, "True"),
    (["benign"] * 60 + ["malignant"] * 40, "malignant"),  # no convention: the rarest
    (["a"] * 50 + ["b"] * 30 + ["c"] * 20, "c"),
])
def test_the_positive_class_is_the_1_of_conventional_labels_else_the_rarest(labels: list, expected: str) -> None:
    table = pd.DataFrame({"x": range(len(labels)), "label": labels})
    assert draft_contract(table, "label", "any", "any.csv").positive_class == expected


def test_the_yaml_reads_back_as_the_same_contract_and_heads_with_what_to_review() -> None:
    drafted = draft_contract(heart_table(), "target", "heart", "heart.csv")
    text = drafted.to_yaml("heart.csv", 120)
    assert text.startswith("# Drafted by `keel contract draft` from heart.csv (120 rows).")
    assert "#   patient_id: an identifier" in text and "#   ca: numbers but for '?'" in text
    assert parse_contract(yaml.safe_load(text), "contract.yaml") == drafted.contract


def test_the_printed_config_runs_the_tabular_pipeline_on_the_drafted_contract(tmp_path: Path) -> None:
    """The bundled config's slices and positive class name breast-cancer columns; the snippet replaces them,
    and a contract file replaces the bundled contract rather than merging into it."""
    drafted = draft_contract(heart_table(), "target", "heart", "heart.csv")
    (tmp_path / "contract.yaml").write_text(drafted.to_yaml("heart.csv", 120))
    (tmp_path / "keel.yaml").write_text(yaml.safe_dump(config_snippet("contract.yaml", drafted, "heart")))
    config = load_pipeline_config(MEDICAL_CONFIG, tmp_path / "keel.yaml")
    assert config.contract == drafted.contract and config.registry.model_name == "heart"
    assert config.evaluate.positive_class == drafted.positive_class and config.evaluate.slices == []


def test_an_inline_contract_mapping_still_merges_over_the_bundled_one(tmp_path: Path) -> None:
    (tmp_path / "relaxed.yaml").write_text("contract: {thresholds: {min_rows: 50}}\n")
    config = load_pipeline_config(MEDICAL_CONFIG, tmp_path / "relaxed.yaml")
    assert config.contract.thresholds.min_rows == 50 and len(config.contract.columns) == 31


@pytest.mark.parametrize("table, target, message", [
    (heart_table(), "outcome", r"heart.csv: no column 'outcome' to predict; the file has \['patient_id', 'age'"),
    (heart_table().assign(target=[None, *range(119)]), "target", "column 'target': 1 row.* no label"),
    (heart_table().assign(target=range(120)), "target", "120 distinct values; .* at most 50 classes. A quantity "
                                                          r"to predict is regression, .* \(pandas.cut\)"),
    (heart_table().assign(target=[f"t{i}" for i in range(120)]), "target", "at most 50 classes.$"),
])
def test_a_table_that_cannot_be_drafted_says_why(table: pd.DataFrame, target: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        draft_contract(table, target, "heart", "heart.csv")


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data_frames([column("x", dtype=float, elements=st.floats(allow_infinity=False)),
                    column("n", dtype=int, elements=st.integers(-1000, 1000)),
                    column("c", elements=st.sampled_from(["a", "b", "c", None])),
                    column("t", elements=st.text(max_size=5)),
                    column("label", elements=st.sampled_from(["yes", "no"]))],
                   index=range_indexes(min_size=2, max_size=40)))
def test_any_table_passes_the_contract_drafted_from_it(table: pd.DataFrame) -> None:
    if table["label"].nunique() < 2:
        with pytest.raises(DataError, match="column 'label' holds one class only"):
            draft_contract(table, "label", "any", "any.csv")
        return
    drafted = draft_contract(table, "label", "any", "any.csv")
    report = quality_report(table, drafted.contract)
    assert report["passed"], report["violations"]
