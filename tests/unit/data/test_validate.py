from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from keel import storage
from keel.data.contract import DataContract, load_contract, parse_contract
from keel.data.ingest import ingest
from keel.data.validate import REPORT_HTML, quality_report, validate
from keel.errors import ConfigError, DataContractError
from keel.settings import KeelSettings
from tests.conftest import REPO_ROOT, SMALL_CONTRACT, artifact_files, small_frame


def test_repository_contracts_parse() -> None:
    contract = load_contract(REPO_ROOT / "pipelines/medical_diagnosis/contract.yaml")
    assert contract.target == "diagnosis" and len(contract.features) == 30


@pytest.mark.parametrize("change, message", [
    ({"target": "nope"}, "target 'nope' is not among the columns"),
    ({"columns": {"outcome": {"dtype": "decimal"}}}, r"columns.outcome.dtype"),
    ({"columns": {"outcome": {"dtype": "category", "colour": 1}}}, r"columns.outcome.colour"),
    ({"columns": {"outcome": {"dtype": "float", "min": 5, "max": 1}}}, "min .* greater than max"),
    ({"thresholds": {"max_missing_fraction": 2}}, "thresholds.max_missing_fraction"),
    # a misspelt key gets the nearest real one, also under a column named like a field ('min')
    ({"threshold": {}}, r"threshold: Extra inputs are not permitted \(did you mean 'thresholds'\?\)"),
    ({"columns": {"min": {"dtype": "float", "nullabel": True}}}, r"columns.min.nullabel: .*'nullable'\?"),
    ({"columns": {"outcome": {"dtype": "category", "alowed": ["a"]}}}, r"columns.outcome.alowed: .*'allowed'\?"),
])
def test_bad_contracts_name_the_field(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_contract({**SMALL_CONTRACT, **change}, "contract.yaml")


def test_good_data_passes_with_a_report(make_contract: Callable[..., DataContract]) -> None:
    report = quality_report(small_frame(100), make_contract())
    assert report["passed"], report["violations"]
    assert set(report["class_balance"]) == {"yes", "no"}
    assert report["columns"]["size"]["missing"] == 0


def _corrupt(column: str, values: list, rows: int = 100):
    frame = small_frame(rows).astype({column: object})
    for i, value in enumerate(values):
        frame.loc[i, column] = value
    return frame


@pytest.mark.parametrize("frame, message", [
    (small_frame(100).drop(columns=["size"]), r"column 'size': missing from the data"),
    (_corrupt("size", ["abc", "x"]), r"column 'size': 2 value\(s\) are not numbers"),
    (_corrupt("size", [np.inf]), r"column 'size': 1 infinite"),
    (_corrupt("size", [None, None, None]), r"column 'size': 3 missing value\(s\), but it may not be null"),
    (_corrupt("size", [-1.0, 500.0]), r"column 'size': 2 value\(s\) outside \[0.0, 100.0\]"),
    (_corrupt("colour", ["purple"]), r"column 'colour': 1 value\(s\) outside \['red', 'green', 'blue'\]"),
    (_corrupt("weight", [None] * 20), r"column 'weight': 20 missing value\(s\) \(20.0%\), above max_missing"),
    (_corrupt("outcome", [None]), r"column 'outcome': 1 missing value"),
    (small_frame(5), r"5 row\(s\), fewer than min_rows 10"),
])
def test_violations_name_column_and_count(frame, message: str, make_contract: Callable[..., DataContract]) -> None:
    report = quality_report(frame, make_contract())
    assert not report["passed"]
    assert any(__import__("re").search(message, v) for v in report["violations"]), report["violations"]


def test_missing_columns_are_one_line_with_the_header_once(make_contract: Callable[..., DataContract]) -> None:
    """A file with another header (here: every name upper-cased but one dropped) must not print its whole
    header once per contract column; columns there under a near name are named with the rename to make."""
    frame = small_frame(100).drop(columns=["weight"])
    frame.columns = [name.upper() for name in frame.columns]
    violations = quality_report(frame, make_contract())["violations"]
    renamed = [v for v in violations if "near names" in v]
    assert len(renamed) == 1 and "'SIZE' -> 'size'" in renamed[0] and "'OUTCOME' -> 'outcome'" in renamed[0]
    assert violations == [*renamed, f"column 'weight': missing from the data (found {sorted(frame.columns)})"]


def test_duplicates_beyond_threshold(make_contract: Callable[..., DataContract]) -> None:
    frame = small_frame(50)
    doubled = pd.concat([frame, frame.head(20)], ignore_index=True)
    contract = make_contract(thresholds={"max_duplicate_fraction": 0.1, "min_rows": 10})
    assert any("20 duplicate row(s)" in v for v in quality_report(doubled, contract)["violations"])


def test_integer_columns_reject_fractions(make_contract: Callable[..., DataContract]) -> None:
    contract = make_contract(columns={**SMALL_CONTRACT["columns"], "size": {"dtype": "int"}})
    assert any("not integers" in v for v in quality_report(small_frame(50), contract)["violations"])


def test_validate_stage_fails_naming_the_source_and_publishes_nothing(
        write_table: Callable[..., Path], settings: KeelSettings, make_contract: Callable[..., DataContract]) -> None:
    source = write_table(_corrupt("size", [-5.0]), "bad.csv")
    dataset = storage.stage_uri(settings, "r1", "ingest")
    ingest(str(source), dataset, settings)
    before = artifact_files(settings)
    with pytest.raises(DataContractError, match=r"(?s)bad.csv: 1 data contract violation.*column 'size': 1 value.*"
                                                r"\nFix the data, or relax the contract's thresholds"):
        validate(dataset, make_contract(), storage.stage_uri(settings, "r1", "validate"), settings)
    assert artifact_files(settings) == before


def test_another_table_than_the_contracts_is_told_to_draft_its_own(
        write_table: Callable[..., Path], settings: KeelSettings, make_contract: Callable[..., DataContract]) -> None:
    """A user's own table on the bundled pipeline: no fix to the data or the thresholds would help."""
    source = write_table(pd.DataFrame({"fare": [7.25, 71.3] * 20, "outcome": ["yes", "no"] * 20}), "titanic.csv")
    dataset = storage.stage_uri(settings, "r1", "ingest")
    ingest(str(source), dataset, settings)
    with pytest.raises(DataContractError, match=r"(?s)missing from the data.*\nIt holds too few of the columns of "
                                                r"contract 'small' .* \(keel contract draft .*titanic.csv --target "
                                                r"COLUMN\) and train with the config it prints\.$"):
        validate(dataset, make_contract(), storage.stage_uri(settings, "r1", "validate"), settings)


def test_validate_stage_publishes_json_and_html(
        write_table: Callable[..., Path], settings: KeelSettings, make_contract: Callable[..., DataContract]) -> None:
    dataset = storage.stage_uri(settings, "r1", "ingest")
    ingest(str(write_table(small_frame(80))), dataset, settings)
    output = storage.stage_uri(settings, "r1", "validate")
    validate(dataset, make_contract(), output, settings)
    html = (Path(output) / REPORT_HTML).read_text()
    assert "Data quality: small (passed)" in html and "colour" in html


@hypothesis_settings(max_examples=80, deadline=None)
@given(cells=st.lists(st.one_of(st.none(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                                st.text(max_size=8), st.booleans()), min_size=1, max_size=30))
def test_any_column_contents_give_a_report_never_a_crash(cells: list) -> None:
    """Whatever a column holds, validation returns a report, and every violation names a column or
    a row-level threshold."""
    import pandas as pd

    from keel.data.contract import parse_contract
    from keel.data.validate import quality_report
    from tests.conftest import SMALL_CONTRACT

    frame = pd.DataFrame({"size": pd.Series(cells, dtype=object), "weight": 1.0, "colour": "red",
                          "outcome": ["yes", "no"] * (len(cells) // 2) + ["yes"] * (len(cells) % 2)})
    report = quality_report(frame, parse_contract(SMALL_CONTRACT, "test"))
    assert report["passed"] == (not report["violations"])
    assert all(v.startswith("column ") or "row(s)" in v for v in report["violations"])
    numeric = pd.to_numeric(pd.Series(cells, dtype=object), errors="coerce")
    if numeric.isna().any():  # a missing or non-numeric size is always reported against 'size'
        assert any(v.startswith("column 'size'") for v in report["violations"])
