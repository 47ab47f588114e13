"""schemathesis over a served FastAPI app, valid and invalid requests, each answer checked against the schema."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

REQUEST_TIMEOUT_S = 120


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
            # The test is about answers, not latency: schemathesis' 10 s default failed a run on a starved CI machine
            response = case.call(timeout=REQUEST_TIMEOUT_S)
            calls.append(response.status_code)
            assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text}"
            # every answer as documented (status, content type, body schema: a null probability fails); a valid
            # request may still be a 422: a number the schema allows can be too large for the network
            case.validate_response(response, excluded_checks=[positive_data_acceptance])
        check()
    return calls
