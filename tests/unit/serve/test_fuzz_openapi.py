"""schemathesis generates requests from the served OpenAPI spec: none may get a 5xx or an undocumented answer."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis

from keel.predictor import Predictor
from keel.recommend.serving import build_recommend_app
from keel.serve.app import build_app
from keel.settings import KeelSettings
from tests.openapi_fuzz import fuzz
from tests.stages import INTEGER_IDS, MIXED_IDS, TEXT_IDS, packaged_recommender, run_stages, write_small_source

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


@pytest.mark.parametrize("ids", [INTEGER_IDS, TEXT_IDS, MIXED_IDS], ids=["integer-ids", "text-ids", "mixed-ids"])
def test_no_recommendation_request_gets_a_server_error(tmp_path: Path, ids: dict[str, list]) -> None:
    """Ids the model never saw, of the other kind, past int64, empty or unicode: each a 200 or a 4xx."""
    app = build_recommend_app(packaged_recommender(tmp_path, ids), "recs", "1")
    schema = schemathesis.openapi.from_asgi("/openapi.json", app).include(path_regex=":recommend$")
    calls = fuzz(schema, CASES // 4, "recs")
    assert len(calls) >= CASES // 4 and 200 in calls and any(400 <= code < 500 for code in calls)
