"""The recommendation route without Ray: ids of the model's kind in and out, a reason for anything else."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from keel.recommend.serving import build_recommend_app
from tests.stages import INTEGER_IDS, MIXED_IDS, TEXT_IDS, packaged_recommender

ROUTE = "/v1/models/recs:recommend"


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TestClient]:
    directory = tmp_path_factory.mktemp("recommend-app")
    return {kind: TestClient(build_recommend_app(packaged_recommender(directory / kind, ids), "recs", "2"))
            for kind, ids in (("integer", INTEGER_IDS), ("text", TEXT_IDS), ("mixed", MIXED_IDS))}


def test_a_text_id_model_is_asked_and_answers_in_strings(clients: dict[str, TestClient]) -> None:
    answer = clients["text"].post(ROUTE, json={"user_ids": ["A1XK", "stranger"], "k": 2})
    assert answer.status_code == 200, answer.text
    known, stranger = answer.json()["recommendations"]
    assert known["user_id"] == "A1XK" and known["source"] == "personalized"
    assert set(known["items"]) <= {"B0003", "SKU-4", "SKU-5", "SKU-6"}  # not the two items A1XK had
    assert stranger == {"user_id": "stranger", "items": ["B0003", "SKU-5"], "scores": [], "known_user": False,
                        "source": "popular"}


def test_users_and_items_may_be_named_by_different_kinds(clients: dict[str, TestClient]) -> None:
    """Text customer ids and integer article ids (as H&M's data has them): strings in, integers back."""
    answer = clients["mixed"].post(ROUTE, json={"user_ids": ["A1XK", "stranger"], "k": 2})
    assert answer.status_code == 200, answer.text
    known, stranger = answer.json()["recommendations"]
    assert known["user_id"] == "A1XK" and all(isinstance(item, int) for item in known["items"])
    assert stranger["items"] == [102, 104]
    schemas = clients["mixed"].get("/openapi.json").json()["components"]["schemas"]
    answered = next(schema for name, schema in schemas.items() if name.startswith("Recommendation_"))
    assert answered["properties"]["user_id"]["type"] == "string"
    assert answered["properties"]["items"]["items"]["type"] == "integer"


@pytest.mark.parametrize("kind, user_ids, wrong", [("text", [10], "valid string"),
                                                   ("integer", ["A1XK"], "valid integer")])
def test_ids_of_the_other_kind_get_a_422_naming_the_field(clients: dict[str, TestClient], kind: str,
                                                          user_ids: list, wrong: str) -> None:
    response = clients[kind].post(ROUTE, json={"user_ids": user_ids})
    assert response.status_code == 422 and "user_ids" in response.text and wrong in response.text, response.text


def test_the_openapi_schema_says_which_kind_of_id(clients: dict[str, TestClient]) -> None:
    for kind, json_type in (("text", "string"), ("integer", "integer")):
        schemas = clients[kind].get("/openapi.json").json()["components"]["schemas"]
        request = next(schema for name, schema in schemas.items() if name.startswith("RecommendRequest"))
        assert request["properties"]["user_ids"]["items"]["type"] == json_type


def test_a_k_past_what_the_user_has_not_seen_returns_what_is_left(clients: dict[str, TestClient]) -> None:
    """User 10 had two of the six items: k=6 answers the other four, never the two back (nor a -inf score,
    which JSON cannot carry: this was a 500)."""
    answer = clients["integer"].post(ROUTE, json={"user_ids": [10, 30], "k": 6})
    assert answer.status_code == 200, answer.text
    known, untrained = answer.json()["recommendations"]
    assert sorted(known["items"]) == [102, 103, 104, 105] and len(known["scores"]) == 4
    assert known["scores"] == sorted(known["scores"], reverse=True)
    assert untrained["items"] == [102, 104, 101, 105] and untrained["source"] == "popular"


def test_metrics_start_the_route_at_zero_and_count_users_by_source(tmp_path: Path) -> None:
    """A recommender nobody calls still has a request series (the no-traffic alert needs one); answered users
    are counted as personalized or popular, the share of users the model does not know."""
    client = TestClient(build_recommend_app(packaged_recommender(tmp_path, TEXT_IDS), "recs", "2"))
    labels = 'model="recs",route="/v1/models/{name}:recommend",version="2"'
    assert f'keel_requests_total{{code="200",{labels}}} 0.0' in client.get("/metrics").text
    assert client.post(ROUTE, json={"user_ids": ["A1XK", "stranger", "another"], "k": 2}).status_code == 200
    text = client.get("/metrics").text
    assert f'keel_requests_total{{code="200",{labels}}} 1.0' in text
    assert 'keel_recommendations_total{model="recs",source="personalized",version="2"} 1.0' in text
    assert 'keel_recommendations_total{model="recs",source="popular",version="2"} 2.0' in text


def test_each_answer_is_handed_on_for_the_shadow_to_compare(tmp_path: Path) -> None:
    """What a champion with a shadow copies: the users asked about, their k, and the items each was given."""
    seen: list[tuple] = []
    recommender = packaged_recommender(tmp_path, TEXT_IDS)
    client = TestClient(build_recommend_app(recommender, "recs", "2",
                                            on_recommended=lambda *answer: seen.append(answer)))
    answer = client.post(ROUTE, json={"user_ids": ["A1XK", "stranger"], "k": 3}).json()["recommendations"]
    assert seen == [(["A1XK", "stranger"], 3, [r["items"] for r in answer])]
    assert client.post(ROUTE, json={"user_ids": [1], "k": 3}).status_code == 422 and len(seen) == 1
