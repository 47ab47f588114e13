"""Eight registrations at once against one fresh SQLite registry: eight distinct versions, no errors.

Exercises the serialized first migration of the SQLite store and the retry
around MLflow's non-atomic dataset get-or-create.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from keel import storage, tracking
from keel.registry import CHAMPION, register
from keel.settings import load_settings
from tests.stages import run_stages, small_config, write_small_source

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _register(home: str, index: int) -> str:
    os.environ["KEEL_HOME"] = home
    settings = load_settings()
    uris = {stage: storage.stage_uri(settings, "base", stage) for stage in ("ingest", "preprocess", "train", "evaluate")}
    registered = register(uris["train"], uris["evaluate"], uris["ingest"], uris["preprocess"], small_config().registry,
                          {}, f"run-{index}", "small", storage.stage_uri(settings, f"run-{index}", "register"), settings)
    return str(registered["version"])


def test_eight_concurrent_registrations(keel_home: Path, tmp_path: Path) -> None:
    # The stages' gate looks up a champion; it does so in another store, so the registry stays untouched.
    run_stages(load_settings(mlflow_tracking_uri=f"sqlite:///{tmp_path}/stages.db"), "base",
               write_small_source(tmp_path))
    assert not (keel_home / "mlflow.db").exists()  # every process races to create the store
    spawn = multiprocessing.get_context("spawn")  # fork after torch has threads can deadlock
    with ProcessPoolExecutor(8, mp_context=spawn) as pool:
        versions = list(pool.map(_register, [str(keel_home)] * 8, range(8)))
    assert sorted(versions, key=int) == [str(v) for v in range(1, 9)]
    client = tracking.mlflow_client(load_settings())
    # all eight were gated against "no champion": the first to register is champion, the rest see it changed
    assert str(client.get_model_version_by_alias("small-model", CHAMPION).version) in versions
