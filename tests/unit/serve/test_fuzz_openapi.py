"""schemathesis generates requests from the served OpenAPI spec: none may get a 5xx."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from keel.predictor import Predictor
from keel.serve.app import build_app
from keel.settings import KeelSettings
from tests.stages import run_stages, write_small_source

CASES = 1000


@pytest.fixture(scope="session")
def api_schema(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    directory = tmp_path_factory.mktemp("fuzz")
    uris = run_stages(KeelSettings(home=directory / ".keel"), "fuzz", write_small_source(directory))
    app = build_app(Predictor.load(Path(uris["train"])), "small-model", "1")
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_no_request_gets_a_server_error(api_schema) -> None:  # type: ignore[no-untyped-def]
    # Strategies per operation rather than schemathesis' pytest plugin, which this pytest version breaks.
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 6
    calls = []
    # hypothesis stops early where an operation has few distinct inputs (GETs without parameters),
    # so the request-bearing operations carry most of the CASES
    per_operation = CASES // 2
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=per_operation, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def check(case) -> None:  # type: ignore[no-untyped-def]
            response = case.call()
            calls.append(response.status_code)
            assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text}"
        check()
    assert len(calls) >= CASES and any(code == 200 for code in calls) and any(400 <= code < 500 for code in calls)
