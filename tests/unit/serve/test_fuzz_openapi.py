"""schemathesis generates requests from the served OpenAPI spec: none may get a 5xx or an undocumented answer."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import schemathesis
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from hypothesis import HealthCheck, given, settings

from keel.predictor import Predictor
from keel.recommend.serving import build_recommend_app
from keel.serve.app import build_app
from keel.settings import KeelSettings
from tests.stages import INTEGER_IDS, TEXT_IDS, packaged_recommender, run_stages, write_small_source

CASES = 1000


@pytest.fixture(scope="session")
def api_schema(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    directory = tmp_path_factory.mktemp("fuzz")
    uris = run_stages(KeelSettings(home=directory / ".keel"), "fuzz", write_small_source(directory))
    app = build_app(Predictor.load(Path(uris["train"])), "small-model", "1")
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_no_request_gets_a_server_error(api_schema) -> None:  # type: ignore[no-untyped-def]
    calls = fuzz(api_schema, CASES // 2, "small-model")
    assert len(calls) >= CASES and any(code == 200 for code in calls) and any(400 <= code < 500 for code in calls)


@pytest.mark.parametrize("ids", [INTEGER_IDS, TEXT_IDS], ids=["integer-ids", "text-ids"])
def test_no_recommendation_request_gets_a_server_error(tmp_path: Path, ids: dict[str, list]) -> None:
    """Ids the model never saw, of the other kind, past int64, empty or unicode: each a 200 or a 4xx."""
    app = build_recommend_app(packaged_recommender(tmp_path, ids), "recs", "1")
    schema = schemathesis.openapi.from_asgi("/openapi.json", app).include(path_regex=":recommend$")
    calls = fuzz(schema, CASES // 4, "recs")
    assert len(calls) >= CASES // 4 and 200 in calls and any(400 <= code < 500 for code in calls)


def fuzz(api_schema, per_operation: int, model_name: str) -> list[int]:  # type: ignore[no-untyped-def]
    """Each operation's generated requests, valid and invalid (half each); their status codes. None may be a 5xx.

    The path's model name is the served one: a generated name is a 404 before the body is read, and the body
    is what is fuzzed (a wrong name has its own tests)."""
    # Strategies per operation rather than schemathesis' pytest plugin, which this pytest version breaks.
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert operations
    calls: list[int] = []
    for operation, mode in itertools.product(operations, GenerationMode):
        if mode is GenerationMode.NEGATIVE and not list(operation.body):
            continue  # nothing to get wrong in a GET without parameters
        fixed = {"name": model_name} if "{name}" in operation.path else None

        @given(case=operation.as_strategy(mode, path_parameters=fixed))
        @settings(max_examples=per_operation // 2, deadline=None, suppress_health_check=list(HealthCheck),
                  derandomize=True)
        def check(case) -> None:  # type: ignore[no-untyped-def]
            response = case.call()
            calls.append(response.status_code)
            assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text}"
            # every answer as documented (status, content type, body schema: a null probability fails); a valid
            # request may still be a 422: a number the schema allows can be too large for the network
            case.validate_response(response, excluded_checks=[positive_data_acceptance])
        check()
    return calls
