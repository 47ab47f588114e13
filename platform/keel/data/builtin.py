"""Datasets that ship inside installed packages, addressed as ``builtin://NAME``.

They let the demo and the tests run with no download: the table is written
out as an ordinary CSV file and then ingested like any user's file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from keel.errors import DataError

SCHEME = "builtin://"


def _breast_cancer() -> pd.DataFrame:
    """scikit-learn's Wisconsin diagnostic table, with snake_case columns and named labels."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer(as_frame=True)
    frame = bunch.frame.rename(columns=lambda c: c.replace(" ", "_"))
    frame["diagnosis"] = frame.pop("target").map(dict(enumerate(bunch.target_names)))
    return frame


BUILTIN_DATASETS: dict[str, Callable[[], pd.DataFrame]] = {
    "breast_cancer": _breast_cancer,
}


def is_builtin(source: str) -> bool:
    return source.startswith(SCHEME)


def write_builtin_csv(source: str, dest: Path) -> Path:
    """Write the bundled table named by ``builtin://NAME`` to ``dest`` as CSV."""
    name = source[len(SCHEME):]
    if name not in BUILTIN_DATASETS:
        known = ", ".join(SCHEME + n for n in sorted(BUILTIN_DATASETS))
        raise DataError(f"{source}: no such bundled dataset. Known: {known}.")
    BUILTIN_DATASETS[name]().to_csv(dest, index=False)
    return dest
