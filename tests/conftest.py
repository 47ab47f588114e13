"""Shared fixtures: isolated Keel settings, small data files, a contract factory."""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from keel.data.contract import DataContract, parse_contract
from keel.settings import KeelSettings, load_settings

REPO_ROOT = Path(__file__).resolve().parents[1]


def _map_the_frames_below_to_their_modules() -> None:
    """A pytest-xdist worker runs its tests under frames of code that execnet exec'd: from "<string>", and
    xdist/remote.py as source text rather than as an imported module. inspect cannot map those file names to
    a module, so each inspect.stack() scanned all of sys.modules once or twice per such frame: 157 ms a call
    in a worker that has imported torch, Ray and MLflow, against 1.5 ms outside xdist. kfp calls
    inspect.stack() in every task setter (set_cpu_request, set_memory_limit, ...), so compiling one pipeline
    cost seconds of CPU there, and the in-process compile tests ran 4-10 times slower in CI than alone. Naming
    each frame's module (from its globals) makes every lookup one dict hit."""
    frame = sys._getframe(1)
    while frame is not None:
        inspect.modulesbyfile.setdefault(frame.f_code.co_filename, frame.f_globals.get("__name__", "__main__"))
        frame = frame.f_back


_map_the_frames_below_to_their_modules()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--phase", choices=("all", "shared", "exclusive"), default="all",
        help="shared: only the tests that may run beside others (what `pytest -n` gets); exclusive: only the "
             "tests marked exclusive, which need the machine to themselves. `make test` runs both, in that order.")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Integration tests first. `make test` has pytest-xdist hand out whole files in this order
    # (--no-loadscope-reorder), so the many quick files come last and even out the two workers' ends. Its
    # default order, by number of tests per file, left the minutes-long files of a few tests to the end,
    # where one worker ran them while the other had nothing left.
    items.sort(key=lambda item: item.get_closest_marker("integration") is None)
    phase = config.getoption("--phase")
    if phase == "all":
        return
    wanted = phase == "exclusive"
    keep = [item for item in items if (item.get_closest_marker("exclusive") is not None) == wanted]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A phase with nothing selected (``-k`` picked tests of the other phase only) is not a failure."""
    if session.config.getoption("--phase") != "all" and exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.OK


@pytest.fixture
def keel_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private KEEL_HOME per test; no KEEL_* setting leaks in from the environment."""
    import os

    for name in list(os.environ):
        if name.startswith("KEEL_"):
            monkeypatch.delenv(name)
    home = tmp_path / "keel-home"
    monkeypatch.setenv("KEEL_HOME", str(home))
    monkeypatch.setenv("KEEL_GIT_COMMIT", "test-commit")
    return home


@pytest.fixture
def settings(keel_home: Path) -> KeelSettings:
    return load_settings()


def small_frame(rows: int = 120, seed: int = 0) -> pd.DataFrame:
    """Two informative numeric columns, one categorical, and a binary label."""
    import numpy as np

    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, rows)
    return pd.DataFrame({
        "size": rng.normal(10 + 5 * label, 1.0).round(3),
        "weight": rng.normal(3 - label, 0.5).round(3),
        "colour": rng.choice(["red", "green", "blue"], rows),
        "outcome": np.where(label == 1, "yes", "no"),
    })


SMALL_CONTRACT: dict[str, Any] = {
    "name": "small",
    "target": "outcome",
    "thresholds": {"min_rows": 10, "max_missing_fraction": 0.1},
    "columns": {
        "size": {"dtype": "float", "min": 0, "max": 100},
        "weight": {"dtype": "float", "nullable": True},
        "colour": {"dtype": "category", "allowed": ["red", "green", "blue"]},
        "outcome": {"dtype": "category", "allowed": ["yes", "no"]},
    },
}


def heart_table(rows: int = 120) -> pd.DataFrame:
    """A table shaped like the UCI heart-disease export: an id, a '?' marker, nulls, text, a 0/1 label."""
    import numpy as np

    rng = np.random.default_rng(0)
    vessels = rng.integers(0, 4, rows).astype(str).astype(object)
    vessels[:4] = "?"
    cholesterol = rng.normal(240, 50, rows).round(1)
    cholesterol[::10] = np.nan
    return pd.DataFrame({"patient_id": np.arange(1000, 1000 + rows), "age": rng.integers(29, 78, rows),
                         "sex": rng.choice(["female", "male"], rows), "chol": cholesterol,
                         "smoker": rng.choice([True, False], rows), "ca": vessels,
                         "notes": [f"visit note {i}" for i in range(rows)], "target": rng.integers(0, 2, rows)})


@pytest.fixture
def make_contract() -> Callable[..., DataContract]:
    """A contract for :func:`small_frame`, with sections overridden by keyword."""
    def make(**overrides: Any) -> DataContract:
        payload = json.loads(json.dumps(SMALL_CONTRACT))
        payload.update(overrides)
        return parse_contract(payload, "test contract")
    return make


@pytest.fixture
def write_table(tmp_path: Path) -> Callable[..., Path]:
    """Write a DataFrame as CSV, Parquet or JSONL and return the path."""
    def write(frame: pd.DataFrame, name: str = "data.csv") -> Path:
        path = tmp_path / name
        if name.endswith(".csv"):
            frame.to_csv(path, index=False)
        elif name.endswith(".parquet"):
            frame.to_parquet(path, index=False)
        elif name.endswith(".jsonl"):
            frame.to_json(path, orient="records", lines=True)
        else:
            raise ValueError(name)
        return path
    return write


def artifact_files(settings: KeelSettings) -> list[str]:
    """Every file under the artifact root: for asserting that nothing was half-written."""
    root = Path(settings.artifact_root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []
