"""The serving route for intent classifiers: raw customer text in, intent and probability out.

Mounted on :func:`keel.serve.app.base_app` (auth, limits, health, metrics,
4xx reasons). Texts are scrubbed inside :class:`IntentModel` before they are
tokenized, and no route logs a request body, so personal data in a message
never reaches the replica's logs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from keel.intents.model import IntentModel
from keel.serve.app import MAX_BODY_BYTES, SCORING_ERRORS, base_app, served_model
from keel.serve.metrics import ServingMetrics
from keel.serve.schema import MAX_RECORDS

MAX_TEXT_CHARS = 2000
Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS)]


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[Text] = Field(..., min_length=1, max_length=MAX_RECORDS)


class IntentPrediction(BaseModel):
    intent: str
    probability: float


class ClassifyResponse(BaseModel):
    model_name: str
    model_version: str
    request_id: str
    predictions: list[IntentPrediction]


def build_intents_app(model: IntentModel, model_name: str, model_version: str,
                      metrics: ServingMetrics | None = None, token: str = "",
                      max_body_bytes: int = MAX_BODY_BYTES,
                      on_classified: Callable[[list[str], list[str]], None] | None = None) -> FastAPI:
    """The ``:classify`` API over one text classifier; ``on_classified(texts, intents)`` sees each answer
    (the shadow's copy, in :mod:`keel.serve.shadow`)."""
    metrics = metrics or ServingMetrics(model_name, model_version, model.labels,
                                        prediction_reference=model.prediction_reference)
    app = base_app(model_name, model_version, metrics, token, max_body_bytes,
                   "Customer-service intents from a Keel text classifier.")
    metrics.serves("/v1/models/{name}:classify")

    @app.post("/v1/models/{name}:classify", response_model=ClassifyResponse, tags=["keel"], responses=SCORING_ERRORS,
              dependencies=[served_model(model_name)])
    async def classify(body: ClassifyRequest, request: Request) -> dict[str, Any]:
        metrics.observe_batch(len(body.texts))
        predictions = model.classify(body.texts)
        intents = [p["intent"] for p in predictions]
        metrics.observe_labels(intents)
        if on_classified is not None:
            on_classified(body.texts, intents)
        return {"model_name": model_name, "model_version": model_version, "request_id": request.state.request_id,
                "predictions": predictions}

    return app
