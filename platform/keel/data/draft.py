"""Draft a data contract from a table, so a user's own data needs a review rather than a contract typed by hand.

What a contract pins (type, nullability, range, allowed values) is read off
the file, as TFDV's schema inference or a Great Expectations profiler would:
ranges get headroom over what was seen, and columns that are no feature
(identifiers, free text) are left out with the reason, since the tabular
pipeline one-hot encodes every text column. The draft validates the table it
came from; a person decides what it should refuse.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import yaml

from keel.data.contract import ColumnSpec, DataContract, Thresholds
from keel.errors import DataError

MAX_CATEGORIES = 50  # more distinct texts than this is free text or an identifier, not a category
MAX_CLASSES = 50
RANGE_HEADROOM = 0.1  # of the observed span, on each side
# `id`, `patient_id`, `order-key`, and camelCase `PassengerId`, `customerID`, `userKey`
IDENTIFIER_NAME = re.compile(r"(^|[^A-Za-z])(?i:id|uuid|key)$|[a-z0-9](Id|ID|Uuid|UUID|Key)$")
# Labels whose second value is the positive one by convention, as scikit-learn's pos_label=1 takes it
CONVENTIONAL_BINARY_LABELS = (("0", "1"), ("false", "true"), ("n", "y"), ("no", "yes"), ("negative", "positive"))


@dataclass
class DraftedContract:
    contract: DataContract
    class_counts: dict[str, int]
    left_out: dict[str, str] = field(default_factory=dict)  # column -> why it is not in the contract
    notes: dict[str, str] = field(default_factory=dict)  # column -> what to look at

    def to_yaml(self, source: str, rows: int) -> str:
        """The contract as YAML, headed by where it came from and what to review."""
        lines = [f"# Drafted by `keel contract draft` from {source} ({rows} rows).",
                 f"# Ranges are the observed ones with {RANGE_HEADROOM:.0%} headroom and allowed values the ones "
                 "seen: review both,", "# and the thresholds, before this contract guards training."]
        if self.left_out:
            lines.append("# Left out (validation lists them as extra columns and preprocessing drops them):")
            lines += [f"#   {name}: {why}" for name, why in self.left_out.items()]
        if self.notes:
            lines.append("# Look at:")
            lines += [f"#   {name}: {note}" for name, note in self.notes.items()]
        body = yaml.safe_dump(self.contract.model_dump(mode="json", exclude_defaults=True), sort_keys=False,
                              allow_unicode=True)
        return "\n".join(lines) + "\n" + body

    @property
    def positive_class(self) -> str:
        """The class a classifier is for: the 1 of 0/1 labels (true, yes), whatever its share, as the file's
        author meant it; for other labels the rarest (the disease, the churner, the fraud)."""
        by_text = {str(label).lower(): label for label in self.class_counts}
        for negative, positive in CONVENTIONAL_BINARY_LABELS:
            if sorted(by_text) == [negative, positive]:
                return str(by_text[positive])
        return min(self.class_counts, key=lambda label: (self.class_counts[label], label))


def draft_contract(frame: pd.DataFrame, target: str, name: str, origin: str) -> DraftedContract:
    """A contract the table passes: each column typed, ranged and marked nullable as the data shows."""
    if target not in frame.columns:
        raise DataError(f"{origin}: no column {target!r} to predict; the file has {[str(c) for c in frame.columns]}.")
    columns = {target: _target_spec(frame[target], origin)}
    left_out: dict[str, str] = {}
    notes: dict[str, str] = {}
    for column in (c for c in frame.columns if c != target):
        spec, remark = _feature_spec(str(column), frame[column])
        if spec is None:
            left_out[str(column)] = remark
            continue
        columns[str(column)] = spec
        if remark:
            notes[str(column)] = remark
    missing = [float(frame[c].isna().mean()) for c, spec in columns.items() if spec.nullable]
    thresholds = Thresholds(max_missing_fraction=math.ceil(100 * max(missing)) / 100 if missing else 0.0)
    ordered = {str(c): columns[str(c)] for c in frame.columns if str(c) in columns}  # the file's order
    return DraftedContract(DataContract(name=name, target=target, columns=ordered, thresholds=thresholds),
                           {str(k): int(v) for k, v in frame[target].value_counts().items()}, left_out, notes)


def _target_spec(values: pd.Series, origin: str) -> ColumnSpec:
    """Classes as seen: integers stay integers (0/1 labels), anything else is a category."""
    if values.isna().any():
        raise DataError(f"{origin}: column {values.name!r}: {int(values.isna().sum())} row(s) have no label; drop "
                        "them before training on it.")
    classes = sorted(values.unique().tolist(), key=str)
    if len(classes) < 2:
        raise DataError(f"{origin}: column {values.name!r} holds one class only ({classes[0]!r}); a classifier "
                        "needs rows of at least two.")
    if len(classes) > MAX_CLASSES:
        numeric = pd.api.types.is_numeric_dtype(values)
        raise DataError(f"{origin}: column {values.name!r} has {len(classes)} distinct values; the tabular pipeline "
                        f"classifies into at most {MAX_CLASSES} classes."
                        + (" A quantity to predict is regression, which it does not train: bin the column into "
                           "classes first (pandas.cut)." if numeric else ""))
    if pd.api.types.is_integer_dtype(values):
        return ColumnSpec(dtype="int", allowed=sorted(int(v) for v in classes))
    return ColumnSpec(dtype="category", allowed=[str(v) for v in classes])


def _feature_spec(name: str, values: pd.Series) -> tuple[ColumnSpec | None, str]:
    """The column's spec and a remark (why it is left out when the spec is None, else what to look at)."""
    present = values.dropna()
    nullable = len(present) < len(values)
    if present.empty:
        return None, "every value is missing"
    if pd.api.types.is_datetime64_any_dtype(present) or pd.api.types.is_timedelta64_dtype(present):
        return None, "a date-time (derive features such as the month or an age from it first)"
    if pd.api.types.is_bool_dtype(present) or present.map(type).eq(bool).all():
        return ColumnSpec(dtype="bool", nullable=nullable), ""
    numbers = pd.to_numeric(present, errors="coerce")
    if numbers.notna().all():
        integral = bool((numbers == numbers.round()).all())
        if integral and numbers.is_unique and len(numbers) > MAX_CATEGORIES:
            if IDENTIFIER_NAME.search(name):
                return None, f"an identifier ({len(numbers)} distinct integers)"
            if numbers.max() - numbers.min() + 1 == len(numbers):  # a saved index such as pandas' `Unnamed: 0`
                return None, f"row numbers ({numbers.min():.0f} to {numbers.max():.0f}, one per row)"
        low, high = _with_headroom(float(numbers.min()), float(numbers.max()), integral)
        return ColumnSpec(dtype="int" if integral else "float", nullable=nullable, min=low, max=high), ""
    text = present.astype(str)
    if _all_dates(text):
        return None, "a date-time (derive features such as the month or an age from it first)"
    distinct = text.unique()
    strays = text[numbers.isna()].value_counts()
    markers = ", ".join(f"{value!r} ({count} row(s))" for value, count in strays.head(3).items())
    numbers_but_markers = numbers.notna().mean() >= 0.9  # a marker such as '?' or 'n/a' for a missing number
    if len(distinct) > MAX_CATEGORIES:
        if numbers_but_markers:
            return None, f"numbers but for {markers}; make those cells empty to use it as a number"
        return None, f"free text or an identifier ({len(distinct)} distinct values)"
    spec = ColumnSpec(dtype="category", nullable=nullable, allowed=sorted(distinct.tolist()))
    if numbers_but_markers:
        return spec, f"numbers but for {markers}: typed as a category; make those cells empty to type it a number"
    return spec, ""


def _all_dates(text: pd.Series) -> bool:
    """Dates as a CSV or JSON holds them (ISO 8601 text): typed a category, they would refuse every later date."""
    distinct = pd.Series(text.unique())
    try:  # a few values first: free text with a million distinct values is rarely worth parsing whole
        return all(pd.to_datetime(values, errors="coerce", format="ISO8601").notna().all()
                   for values in (distinct.head(20), distinct))
    except (ValueError, TypeError, OverflowError):  # time zones mixed with naive times, and the like
        return False


def _with_headroom(low: float, high: float, integral: bool) -> tuple[float, float]:
    """The observed range widened on each side, never below 0 for a column that never was, and rounded
    outwards to four significant digits (or whole numbers), so the bounds read like ones a person wrote."""
    span = (high - low) or abs(high) or 1.0
    wider_low, wider_high = low - RANGE_HEADROOM * span, high + RANGE_HEADROOM * span
    if not (math.isfinite(wider_low) and math.isfinite(wider_high)):  # values near the float limits
        return low, high
    if low >= 0:
        wider_low = max(wider_low, 0.0)
    if integral:
        return float(math.floor(wider_low)), float(math.ceil(wider_high))
    return _round_out(wider_low, up=False), _round_out(wider_high, up=True)


def _round_out(value: float, up: bool) -> float:
    if value == 0:
        return 0.0
    exponent = math.floor(math.log10(abs(value))) - 3
    step = 10.0 ** exponent
    rounded = (math.ceil if up else math.floor)(value / step) * step
    return round(rounded, max(0, -exponent))


def config_snippet(contract_path: str, drafted: DraftedContract, model_name: str) -> dict[str, Any]:
    """The config that runs the tabular pipeline on the drafted contract: its own contract (replacing the
    bundled one), its positive class, no slices until the user picks a column, and its own
    registered model name."""
    return {"contract": contract_path, "evaluate": {"slices": [], "positive_class": drafted.positive_class},
            "registry": {"model_name": model_name}}
