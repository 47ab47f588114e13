"""The serving route for recommenders: user ids in, top-k item ids out.

Ids are the model's kind, integers or text, and the OpenAPI schema says which.

Mounted on :func:`keel.serve.app.base_app`, so it has the same auth, limits,
health routes, metrics and 4xx errors as the classifiers' API. An unknown user
is not an error: the answer is the popular list, marked ``"source": "popular"``.
"""

# No `from __future__ import annotations`: the route's body type is chosen at run time and FastAPI reads it.
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from keel.recommend.recommender import MAX_K, Recommender
from keel.serve.app import MAX_BODY_BYTES, SCORING_ERRORS, base_app, served_model
from keel.serve.metrics import ServingMetrics
from keel.serve.schema import MAX_RECORDS

# The model's kinds of id: a text-id model is asked and answers in strings; users and items may differ (text
# customer ids, integer article ids)
UserIdT = TypeVar("UserIdT", int, str)
ItemIdT = TypeVar("ItemIdT", int, str)


class RecommendRequest(BaseModel, Generic[UserIdT]):
    model_config = ConfigDict(extra="forbid", strict=True)  # `true` is no user id, nor "10" a k

    user_ids: list[UserIdT] = Field(..., min_length=1, max_length=MAX_RECORDS)
    k: int = Field(default=10, ge=1, le=MAX_K)


class Recommendation(BaseModel, Generic[UserIdT, ItemIdT]):
    user_id: UserIdT
    items: list[ItemIdT] = Field(description="best first; fewer than k when the user has seen all but a few items")
    scores: list[float] = Field(description="the model's score of each item; empty for the popular list")
    known_user: bool
    source: str


class RecommendResponse(BaseModel, Generic[UserIdT, ItemIdT]):
    model_name: str
    model_version: str
    request_id: str
    recommendations: list[Recommendation[UserIdT, ItemIdT]]


def build_recommend_app(recommender: Recommender, model_name: str, model_version: str,
                        metrics: ServingMetrics | None = None, token: str = "",
                        max_body_bytes: int = MAX_BODY_BYTES,
                        on_recommended: Callable[[list[Any], int, list[list[Any]]], None] | None = None) -> FastAPI:
    """The ``:recommend`` API over one recommender; ``on_recommended(user_ids, k, ranked items)`` sees each
    answer (the shadow's copy, in :mod:`keel.serve.shadow`)."""
    metrics = metrics or ServingMetrics(model_name, model_version, [])
    app = base_app(model_name, model_version, metrics, token, max_body_bytes,
                   "Top-k recommendations from a Keel recommender.")
    metrics.serves("/v1/models/{name}:recommend")

    users, items = recommender.user_id_type, recommender.item_id_type
    request_type = RecommendRequest[users]  # type: ignore[valid-type]
    response_type = RecommendResponse[users, items]  # type: ignore[valid-type]

    @app.post("/v1/models/{name}:recommend", response_model=response_type, tags=["keel"], responses=SCORING_ERRORS,
              dependencies=[served_model(model_name)])
    async def recommend(body: request_type, request: Request) -> dict[str, Any]:  # type: ignore[valid-type]
        metrics.observe_batch(len(body.user_ids))
        recommendations = recommender.recommend(body.user_ids, body.k)
        metrics.observe_sources([r["source"] for r in recommendations])
        if on_recommended is not None:
            on_recommended(body.user_ids, body.k, [r["items"] for r in recommendations])
        return {"model_name": model_name, "model_version": model_version, "request_id": request.state.request_id,
                "recommendations": recommendations}

    return app
