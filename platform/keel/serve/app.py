"""The serving API: Keel's own predict route and the Open Inference Protocol (KServe V2).

:func:`build_app` returns a FastAPI app over one model. Ray Serve mounts it as
its ingress (see :mod:`keel.serve.deployment`); tests and the plain-FastAPI
benchmark baseline run it directly. Malformed requests get a 4xx naming the
field at fault, never a 5xx, and the app keeps serving.
"""


import hmac
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pandas as pd
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from keel import __version__
from keel.errors import DataError
from keel.predictor import Predictor
from keel.serve.metrics import ServingMetrics
from keel.serve.schema import Prediction, PredictResponse, V2InferRequest, predict_request_model

Scorer = Callable[[pd.DataFrame], Awaitable[np.ndarray]]
Divert = Callable[[Request], Awaitable[Response | None]]
MAX_BODY_BYTES = 1 << 20
# Probes and Prometheus reach these without a token: they reveal no predictions.
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/metrics"})
# What a scoring route may answer besides 200, documented in its OpenAPI schema (schemathesis holds it to it).
SCORING_ERRORS: dict[int | str, dict[str, Any]] = {400: {}, 404: {}, 413: {}, 415: {}, 422: {}}
V2_NUMERIC = {"FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}


class RequestError(Exception):
    """A client error with the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _is_v2(request: Request) -> bool:
    return request.url.path.startswith("/v2/")


def _error(request: Request, status: int, message: str) -> JSONResponse:
    # The Open Inference Protocol's error body is {"error": ...}; FastAPI's is {"detail": ...}.
    body: dict[str, str] = {"error": message} if _is_v2(request) else {"detail": message}
    identity = getattr(request.app.state, "identity", {})
    return JSONResponse({**body, **identity}, status_code=status)


def _describe_validation(errors: list[dict[str, Any]]) -> tuple[int, str]:
    """A 400 for unparseable JSON, else a 422 listing each field at fault."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "request body is not valid JSON"
    problems = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in errors[:10]]
    return 422, "; ".join(problems)


def _unparsed_body(request: Request) -> str | None:
    """How a body FastAPI left unparsed was sent: it reads JSON only under ``application/json`` or
    ``application/*+json`` (FastAPI's strict content types, on by default). curl's ``-d`` without ``-H``
    sends a form type; ``requests.post(url, data=...)`` sends none."""
    content_type = request.headers.get("content-type", "")
    maintype, _, subtype = content_type.split(";", 1)[0].strip().lower().partition("/")
    if maintype == "application" and (subtype == "json" or subtype.endswith("+json")):
        return None
    return f"as {content_type!r}" if content_type else "without a content type"


def direct_scorer(predictor: Predictor, metrics: ServingMetrics) -> Scorer:
    """Score each request on its own (no batching): for tests and the plain-FastAPI baseline."""
    async def score(frame: pd.DataFrame) -> np.ndarray:
        metrics.observe_batch(len(frame))
        return predictor.predict_proba(frame)
    return score


def _v2_frame(payload: V2InferRequest, columns: list[str]) -> pd.DataFrame:
    """One DataFrame column per input tensor; every column of the model must be present."""
    data: dict[str, list[Any]] = {}
    rows = None
    for tensor in payload.inputs:
        if tensor.name not in columns:
            raise RequestError(400, f"input {tensor.name!r} is not a model input; expected {columns}")
        if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
            raise RequestError(400, f"input {tensor.name!r}: shape {tensor.shape} must be [N] or [N, 1]")
        if tensor.shape[0] != len(tensor.data) or (rows is not None and rows != tensor.shape[0]):
            raise RequestError(400, f"input {tensor.name!r}: shape {tensor.shape} does not match "
                                    f"{len(tensor.data)} data element(s) or the other inputs")
        if tensor.datatype not in V2_NUMERIC | {"BYTES"}:
            raise RequestError(400, f"input {tensor.name!r}: unsupported datatype {tensor.datatype!r}")
        rows = tensor.shape[0]
        data[tensor.name] = tensor.data
    missing = [c for c in columns if c not in data]
    if missing:
        raise RequestError(400, f"missing input(s) {missing}")
    return pd.DataFrame(data)


def unauthorized(request: Request, token: str) -> str:
    """Why a request lacks the bearer token (empty when it carries it, or needs none)."""
    if not token or request.url.path in OPEN_PATHS:
        return ""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials:
        return "missing bearer token: send the header 'Authorization: Bearer <token>'"
    if not hmac.compare_digest(credentials.strip().encode(), token.encode()):
        return "invalid bearer token"
    return ""


async def _diverted(request: Request) -> Response | None:
    """Another app's answer to a scoring request (a canary's), or None when this app answers it."""
    divert: Divert | None = request.app.state.divert
    return await divert(request) if divert is not None and request.method == "POST" else None


def base_app(model_name: str, model_version: str, metrics: ServingMetrics, token: str = "",
             max_body_bytes: int = MAX_BODY_BYTES, description: str = "") -> FastAPI:
    """What every Keel model server has, whatever it predicts: request ids, bearer-token auth, body
    limits, 4xx errors with a reason, health and model-ready routes and ``/metrics``. Model routes are added
    on top."""
    app = FastAPI(title=f"Keel model server: {model_name}", version=model_version, description=description)

    @app.middleware("http")
    async def envelope(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        request.state.request_id = request_id
        started = time.perf_counter()
        length = request.headers.get("content-length")
        refusal = unauthorized(request, token)
        if refusal:
            response: Response = _error(request, 401, refusal)
            response.headers["www-authenticate"] = "Bearer"
        elif length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            response = _error(request, 413, f"request body over {max_body_bytes} bytes")
        else:
            response = await _diverted(request) or await call_next(request)
        for header, value in (("x-request-id", request_id), ("x-model-name", model_name),
                              ("x-model-version", model_version)):
            response.headers.setdefault(header, value)  # a canary's answer keeps its own version
        if request.url.path != "/metrics":
            metrics.observe_request(request.url.path, response.status_code, time.perf_counter() - started)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        unparsed = _unparsed_body(request)
        if unparsed is not None:
            return _error(request, 415, f"the body was sent {unparsed}; send JSON, with the header "
                                        "'content-type: application/json'")
        return _error(request, *_describe_validation(list(exc.errors())))

    @app.exception_handler(RequestError)
    async def rejected(request: Request, exc: RequestError) -> JSONResponse:
        return _error(request, exc.status, exc.message)

    @app.get("/v2/health/live", tags=["v2"])
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", tags=["v2"])
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.get("/v2/models/{name}/ready", tags=["v2"], responses={404: {}}, dependencies=[served_model(model_name)])
    async def model_ready() -> dict[str, Any]:
        return {"name": model_name, "ready": True}

    @app.get("/v2", tags=["v2"])
    async def server_metadata() -> dict[str, Any]:
        return {"name": "keel", "version": __version__, "extensions": []}

    # KServe's V1 data plane, whose `:predict` the model routes speak: a client written for it lists the
    # models and asks whether one is ready before it predicts.
    @app.get("/v1/models", tags=["v1"])
    async def list_models() -> dict[str, list[str]]:
        return {"models": [model_name]}

    @app.get("/v1/models/{name}", tags=["v1"], responses={404: {}}, dependencies=[served_model(model_name)])
    async def v1_model_ready() -> dict[str, Any]:
        return {"name": model_name, "ready": True}

    @app.get("/metrics", include_in_schema=False)
    async def scrape() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.state.identity = {"model_name": model_name, "model_version": model_version}
    app.state.divert = None  # a Divert the Serve replica sets when a canary answers some requests
    app.state.metrics = metrics
    return app


def served_model(model_name: str) -> Any:
    """A route dependency answering 404, naming the served model, when the path names another.

    A dependency runs before the body is validated, so a request to the wrong model hears that, not a 422
    listing what its body lacks for this one. Async, so FastAPI runs it on the event loop: a plain function
    dependency would cost every request a hop to its thread pool.
    """
    async def check_name(name: str) -> None:
        if name != model_name:
            raise RequestError(404, f"unknown model {name!r}; this server serves {model_name!r}")
    return Depends(check_name)


def build_app(predictor: Predictor, model_name: str, model_version: str, scorer: Scorer | None = None,
              metrics: ServingMetrics | None = None, max_body_bytes: int = MAX_BODY_BYTES,
              token: str = "") -> FastAPI:
    """The API over one model; ``scorer`` lets Ray Serve batch requests across callers.

    With a ``token``, every route but health and metrics answers 401 unless the
    request carries ``Authorization: Bearer <token>``.
    """
    metrics = metrics or ServingMetrics(model_name, model_version, predictor.classes,
                                        predictor.transform.reference,
                                        prediction_reference=predictor.prediction_reference)
    score = scorer or direct_scorer(predictor, metrics)
    request_model = predict_request_model(predictor.transform)
    columns = predictor.transform.input_columns
    classes = predictor.classes
    app = base_app(model_name, model_version, metrics, token, max_body_bytes,
                   "Predictions from a Keel model, in Keel's own format and the Open Inference Protocol.")
    metrics.serves("/v1/models/{name}:predict")
    known_name = served_model(model_name)

    async def predict_frame(frame: pd.DataFrame) -> np.ndarray:
        try:
            probabilities = await score(frame)
        except DataError as e:
            raise RequestError(422, e.headline) from e
        metrics.observe_predictions(probabilities)
        metrics.observe_inputs(frame)
        return probabilities

    @app.post("/v1/models/{name}:predict", response_model=PredictResponse, tags=["keel"], responses=SCORING_ERRORS,
              dependencies=[known_name])
    async def predict(body: request_model, request: Request) -> PredictResponse:  # type: ignore[valid-type]
        frame = pd.DataFrame([r.model_dump() for r in body.records], columns=columns)  # type: ignore[attr-defined]
        probabilities = await predict_frame(frame)
        return PredictResponse(model_name=model_name, model_version=model_version,
                               request_id=request.state.request_id,
                               predictions=[Prediction(label=classes[int(p.argmax())],
                                                       probabilities=dict(zip(classes, map(float, p), strict=True)))
                                            for p in probabilities])

    @app.get("/v2/models/{name}", tags=["v2"], responses={404: {}}, dependencies=[known_name])
    async def model_metadata() -> dict[str, Any]:
        inputs = [{"name": c, "datatype": "FP64", "shape": [-1]} for c in predictor.transform.numeric]
        inputs += [{"name": c, "datatype": "BYTES", "shape": [-1]} for c in predictor.transform.categorical]
        return {"name": model_name, "versions": [model_version], "platform": "keel-pytorch", "inputs": inputs,
                "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(classes)]}]}

    @app.post("/v2/models/{name}/infer", tags=["v2"], responses=SCORING_ERRORS, dependencies=[known_name])
    async def infer(body: V2InferRequest) -> dict[str, Any]:
        probabilities = await predict_frame(_v2_frame(body, columns))
        labels = [classes[int(i)] for i in probabilities.argmax(axis=1)]
        return {"model_name": model_name, "model_version": model_version, "id": body.id or uuid.uuid4().hex,
                "outputs": [{"name": "label", "datatype": "BYTES", "shape": [len(labels)], "data": labels},
                            {"name": "probabilities", "datatype": "FP32", "shape": list(probabilities.shape),
                             "data": probabilities.astype(float).ravel().tolist()}]}

    return app
