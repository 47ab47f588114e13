"""Validate: check an ingested table against its data contract and report its quality.

When any violation is beyond the contract's thresholds the stage fails with
every violation in its message and publishes nothing; otherwise it publishes
the quality report as JSON and HTML.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import pandas as pd

from keel import storage
from keel.data.columns import name_key
from keel.data.contract import ColumnSpec, DataContract
from keel.data.ingest import DATA_FILE
from keel.errors import DataContractError
from keel.settings import KeelSettings

REPORT_JSON = "quality_report.json"
REPORT_HTML = "quality_report.html"
EXAMPLES_SHOWN = 3


def _examples(values: pd.Series) -> list[Any]:
    return [v.item() if hasattr(v, "item") else v for v in values.drop_duplicates().head(EXAMPLES_SHOWN)]


def _type_problems(name: str, column: pd.Series, spec: ColumnSpec) -> tuple[pd.Series, list[str]]:
    """Coerce a column to its contract type; return the coerced column and type violations."""
    present = column.dropna()
    if spec.dtype in ("float", "int"):
        numeric = pd.to_numeric(column, errors="coerce")
        bad = present[numeric[present.index].isna()]
        problems = []
        if len(bad):
            problems.append(f"column {name!r}: {len(bad)} value(s) are not numbers, e.g. {_examples(bad)}")
        infinite = numeric[np.isinf(numeric.astype(float))]
        if len(infinite):
            problems.append(f"column {name!r}: {len(infinite)} infinite value(s)")
        if spec.dtype == "int":
            finite = numeric.dropna()
            fractional = finite[finite != np.floor(finite)] if len(infinite) == 0 else finite.iloc[0:0]
            if len(fractional):
                problems.append(f"column {name!r}: {len(fractional)} value(s) are not integers, "
                                f"e.g. {_examples(fractional)}")
        return numeric, problems
    if spec.dtype == "bool":
        mapping = {True: True, False: False, 1: True, 0: False, "true": True, "false": False,
                   "True": True, "False": False, "1": True, "0": False}
        coerced = column.map(lambda v: mapping.get(v, np.nan) if pd.notna(v) else np.nan)
        bad = present[coerced[present.index].isna()]
        problem = [f"column {name!r}: {len(bad)} value(s) are not booleans, e.g. {_examples(bad)}"] if len(bad) else []
        return coerced, problem
    return column.map(lambda v: str(v) if pd.notna(v) else v), []


def _range_problems(column: pd.Series, spec: ColumnSpec) -> tuple[int, list[Any]]:
    """Count values outside [min, max] or outside the allowed set."""
    present = column.dropna()
    outside = pd.Series(False, index=present.index)
    if spec.min is not None:
        outside |= present.astype(float) < spec.min
    if spec.max is not None:
        outside |= present.astype(float) > spec.max
    if spec.allowed is not None:
        allowed = {str(a) for a in spec.allowed}
        outside |= ~present.astype(str).isin(allowed)
    return int(outside.sum()), _examples(present[outside])


def _column_report(name: str, column: pd.Series, spec: ColumnSpec, contract: DataContract,
                   rows: int) -> tuple[dict[str, Any], list[str]]:
    limits = contract.thresholds
    coerced, violations = _type_problems(name, column, spec)
    missing = int(column.isna().sum())
    out_of_range, examples = _range_problems(coerced, spec) if not violations else (0, [])
    entry = {"dtype": spec.dtype, "missing": missing, "missing_pct": round(100 * missing / rows, 3),
             "out_of_range": out_of_range, "out_of_range_examples": examples}
    must_be_complete = not spec.nullable or name == contract.target
    if missing and must_be_complete:
        violations.append(f"column {name!r}: {missing} missing value(s), but it may not be null")
    elif missing / rows > limits.max_missing_fraction:
        violations.append(f"column {name!r}: {missing} missing value(s) ({entry['missing_pct']}%), "
                          f"above max_missing_fraction {limits.max_missing_fraction}")
    if out_of_range / rows > limits.max_out_of_range_fraction:
        bounds = spec.allowed if spec.allowed is not None else f"[{spec.min}, {spec.max}]"
        violations.append(f"column {name!r}: {out_of_range} value(s) outside {bounds}, e.g. {examples}")
    return entry, violations


def _missing_column_problems(expected: list[str], found: list[str]) -> list[str]:
    """One line for the contract columns the data has under near names (case, spaces, punctuation) and one for
    the rest: a file with another header would otherwise print its whole header once per contract column."""
    spare = {name_key(column): column for column in found if column not in expected}
    missing = [name for name in expected if name not in found]
    renamed = {name: spare[name_key(name)] for name in missing if name_key(name) in spare}
    absent = [name for name in missing if name not in renamed]
    problems = []
    if renamed:
        renames = ", ".join(f"{near!r} -> {name!r}" for name, near in renamed.items())
        problems.append(f"{len(renamed)} contract column(s) are in the data under near names; rename them to "
                        f"match the contract: {renames}")
    if absent:
        named = f"column {absent[0]!r}" if len(absent) == 1 else f"columns {absent}"
        problems.append(f"{named}: missing from the data (found {found})")
    return problems


def quality_report(frame: pd.DataFrame, contract: DataContract) -> dict[str, Any]:
    """Per-column quality figures plus every contract violation found."""
    rows = len(frame)
    found = sorted(map(str, frame.columns))
    violations = _missing_column_problems(list(contract.columns), found)
    columns: dict[str, Any] = {}
    for name, spec in contract.columns.items():
        if name in frame.columns:
            columns[name], problems = _column_report(name, frame[name], spec, contract, rows)
            violations.extend(problems)
    duplicates = int(frame.duplicated().sum())
    limits = contract.thresholds
    if rows < limits.min_rows:
        violations.append(f"{rows} row(s), fewer than min_rows {limits.min_rows}")
    if rows and duplicates / rows > limits.max_duplicate_fraction:
        violations.append(f"{duplicates} duplicate row(s), above max_duplicate_fraction {limits.max_duplicate_fraction}")
    balance: dict[str, float] = {}
    if contract.target in frame.columns:
        shares = frame[contract.target].dropna().astype(str).value_counts(normalize=True)
        balance = {str(k): round(float(v), 4) for k, v in shares.sort_index().items()}
        if len(balance) == 1:
            violations.append(f"column {contract.target!r}: only one class ({next(iter(balance))!r}), below "
                              f"min_class_fraction {limits.min_class_fraction} for any other; a classifier "
                              "needs at least two")
        elif balance and min(balance.values()) < limits.min_class_fraction:
            violations.append(f"column {contract.target!r}: smallest class share {min(balance.values())} "
                              f"is below min_class_fraction {limits.min_class_fraction}")
    extra = sorted(str(c) for c in frame.columns if c not in contract.columns)
    return {"contract": contract.name, "rows": rows, "duplicate_rows": duplicates, "columns": columns,
            "class_balance": balance, "extra_columns": extra, "violations": violations,
            "passed": not violations}


def render_html(report: dict[str, Any], source: str) -> str:
    """A self-contained page for the KFP UI and MLflow: no scripts, no external assets."""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{c['dtype']}</td><td>{c['missing']}</td>"
        f"<td>{c['missing_pct']}</td><td>{c['out_of_range']}</td></tr>"
        for name, c in report["columns"].items()
    )
    balance = "".join(f"<li>{html.escape(k)}: {v:.1%}</li>" for k, v in report["class_balance"].items())
    verdict = "passed" if report["passed"] else "failed"
    problems = "".join(f"<li>{html.escape(v)}</li>" for v in report["violations"]) or "<li>none</li>"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Data quality</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;border-bottom:1px solid #ddd}</style>"
        f"</head><body><h1>Data quality: {html.escape(report['contract'])} ({verdict})</h1>"
        f"<p>Source: {html.escape(source)}. Rows: {report['rows']}. Duplicate rows: {report['duplicate_rows']}.</p>"
        "<table><tr><th>column</th><th>dtype</th><th>missing</th><th>missing %</th><th>out of range</th></tr>"
        f"{rows}</table><h2>Class balance</h2><ul>{balance}</ul><h2>Violations</h2><ul>{problems}</ul>"
        "</body></html>"
    )


def _another_table_advice(frame: pd.DataFrame, contract: DataContract, source: str) -> list[str]:
    """What to do when the table holds under half of the contract's columns: it is not the table the contract
    was written for (a user's own table on the bundled pipeline, without its own contract), and no fix to the
    data or the thresholds would do."""
    if sum(name in frame.columns for name in contract.columns) * 2 >= len(contract.columns):
        return []
    return [f"It holds too few of the columns of contract {contract.name!r} to be the table it describes. For "
            f"another table, draft a contract from it (keel contract draft {source} --target COLUMN) and train "
            "with the config it prints."]


def validate(dataset_uri: str, contract: DataContract, output_uri: str, settings: KeelSettings) -> dict[str, Any]:
    """Check the ingested table at ``dataset_uri``; publish the quality report if it passes.

    Raises:
        DataContractError: naming the source file, each column at fault and its count.
    """
    with storage.staged_output(output_uri, "validate", settings) as out:
        manifest = storage.read_manifest(dataset_uri, settings)
        frame = storage.read_parquet(storage.join(dataset_uri, DATA_FILE), settings)
        report = quality_report(frame, contract)
        source = manifest.get("source", dataset_uri)
        if not report["passed"]:
            raise DataContractError(source, report["violations"], *_another_table_advice(frame, contract, source))
        out.write_json(REPORT_JSON, report)
        out.path(REPORT_HTML).write_text(render_html(report, source))
        out.manifest.update(rows=report["rows"], passed=True, report=out.uri_of(REPORT_JSON),
                            html=out.uri_of(REPORT_HTML))
    return report
