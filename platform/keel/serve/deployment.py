"""Ray Serve deployment of a registered model, with dynamic batching.

Each replica loads the model from the MLflow registry, then mounts the
FastAPI app of :mod:`keel.serve.app` as its ingress. Concurrent requests are
scored together (``@serve.batch``): one forward pass over many callers' rows.
Requests beyond ``max_queued_requests`` get Ray Serve's fast 503, not a hang.
With ``ServeConfig.shadow`` set, each replica also copies scored requests to
the shadow application (:class:`ShadowScorer`; see :mod:`keel.serve.shadow`).
With ``ServeConfig.canary`` set, it routes a share of the scoring requests to
the canary application, another :class:`ModelServer` (see :mod:`keel.serve.canary`).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
from ray import serve
from ray.serve.config import BackpressureConfig

from keel.errors import ConfigError
from keel.serve.canary import CanaryAnswer, CanaryCall, CanaryMetrics, CanaryRouter, ForwardedRequest, answer_in_process
from keel.serve.challenger import CANARY_APP, SHADOW_APP
from keel.serve.config import APP_NAME, CanaryConfig, ServeConfig, ShadowConfig, keel_environment
from keel.serve.shadow import SHADOW_DEPLOYMENT, ShadowCall, ShadowMetrics, ShadowMirror
from keel.tracking import resolve_version
from keel.settings import KeelSettings

if TYPE_CHECKING:  # a replica loads one of them (keel.serve.app); `keel serve status` and the CLI need none (torch)
    from keel.intents.model import IntentModel
    from keel.predictor import Predictor
    from keel.recommend.recommender import Recommender

TEXT_COLUMN = "text"  # what a text classifier's copies carry
USER_COLUMN, K_COLUMN = "user_id", "k"  # what a recommender's copies carry: one request's users and k


@dataclass(frozen=True)
class LoadedModel:
    """A registered version: a tabular classifier's predictor, a recommender or a text (intent) classifier."""

    predictor: Predictor | None
    name: str
    version: str
    recommender: Recommender | None = None
    intents: IntentModel | None = None

    @property
    def kind(self) -> str:
        """What the model answers, and to which requests: a shadow or a canary must be of the champion's kind."""
        if self.predictor is not None:
            return "tabular classifier"
        if self.intents is not None:
            return "text classifier"
        assert self.recommender is not None
        return f"recommender of {self.recommender.user_id_type.__name__} user ids"

    @property
    def compared_columns(self) -> list[str]:
        """The columns a shadow copy carries to this model: a classifier's inputs (``text`` for a text
        classifier); a recommender's users and the k they asked for."""
        if self.predictor is not None:
            return self.predictor.transform.input_columns
        return [TEXT_COLUMN] if self.intents is not None else [USER_COLUMN, K_COLUMN]

    def answers(self, frame: pd.DataFrame) -> list[Any]:
        """This model's answer for each row of a shadow copy: a classifier's predicted class, a recommender's
        ranked items (a tuple, as the copy's champion answers are)."""
        if self.predictor is not None:
            return list(self.predictor.labels(self.predictor.predict_proba(frame)))
        if self.intents is not None:
            return [p["intent"] for p in self.intents.classify(frame[TEXT_COLUMN].tolist())]
        assert self.recommender is not None
        recommendations = self.recommender.recommend(frame[USER_COLUMN].tolist(), int(frame[K_COLUMN].iloc[0]))
        return [tuple(r["items"]) for r in recommendations]


def load_registered(model_uri: str, settings: KeelSettings) -> LoadedModel:
    """The Keel predictor inside a registered pyfunc model, with its name and version."""
    import mlflow

    name, version = resolve_version(model_uri, settings)
    python_model = mlflow.pyfunc.load_model(f"models:/{name}/{version}").unwrap_python_model()
    recommender = getattr(python_model, "recommender", None)
    if recommender is not None:
        return LoadedModel(None, name, version, recommender)
    intents = getattr(python_model, "intents", None)
    if intents is not None:
        return LoadedModel(None, name, version, intents=intents)
    return LoadedModel(python_model.predictor, name, version)


@serve.ingress()
class ModelServer:
    """One replica: the model, its metrics and the HTTP app over them."""

    def __init__(self, model_uri: str, environment: dict[str, str], max_batch_size: int,
                 batch_wait_timeout_s: float, require_token: bool = False,
                 shadow: dict[str, Any] | None = None, canary: dict[str, Any] | None = None) -> None:
        from keel.serve.metrics import ServingMetrics
        from keel.settings import load_settings

        os.environ.update(environment)  # KEEL_* from the deploying process: registry and S3
        settings = load_settings()
        self.token = serving_token(settings, require_token)
        self.model = load_registered(model_uri, settings)
        predictor, intents = self.model.predictor, self.model.intents
        classes = predictor.classes if predictor else intents.labels if intents else []
        classifier = predictor or intents  # a recommender predicts no classes
        self.metrics = ServingMetrics(self.model.name, self.model.version, classes,
                                      predictor.transform.reference if predictor else None,
                                      prediction_reference=classifier.prediction_reference if classifier else None)
        self._score_batch.set_max_batch_size(max_batch_size)  # type: ignore[attr-defined]
        self._score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)  # type: ignore[attr-defined]
        self.mirror: ShadowMirror | None = None
        if shadow is not None:
            self.mirror = ShadowMirror(connect_to_shadow, ShadowConfig.model_validate(shadow),
                                       ShadowMetrics(self.metrics.registry, self.model.name, self.model.version))
        self.router: CanaryRouter | None = None
        if canary is not None:
            self.router = CanaryRouter(connect_to_canary, CanaryConfig.model_validate(canary),
                                       CanaryMetrics(self.metrics.registry, self.model.name, self.model.version))
        self._forwarded_app: Any = None

    def __serve_build_asgi_app__(self) -> Any:
        app = self._build_app()
        if self.router is not None:
            app.state.divert = self.router.divert
        return app

    async def answer_forwarded(self, request: ForwardedRequest) -> CanaryAnswer:
        """As the canary: answer a request the champion routed here, through this replica's own app."""
        if self._forwarded_app is None:
            self._forwarded_app = self._build_app()
        return await answer_in_process(self._forwarded_app, request)

    def _build_app(self) -> Any:
        from keel.serve.app import build_app

        if self.model.recommender is not None:
            from keel.recommend.serving import build_recommend_app

            return build_recommend_app(self.model.recommender, self.model.name, self.model.version,
                                       metrics=self.metrics, token=self.token,
                                       on_recommended=self._copy_recommendations if self.mirror else None)
        if self.model.intents is not None:
            from keel.intents.serving import build_intents_app

            return build_intents_app(self.model.intents, self.model.name, self.model.version, metrics=self.metrics,
                                     token=self.token, on_classified=self._copy_texts if self.mirror else None)
        assert self.model.predictor is not None
        return build_app(self.model.predictor, self.model.name, self.model.version, scorer=self.score,
                         metrics=self.metrics, token=self.token)

    async def score(self, frame: pd.DataFrame) -> np.ndarray:
        return await self._score_batch(frame)

    def _copy_texts(self, texts: list[str], intents: list[str]) -> None:
        assert self.mirror is not None
        self.mirror.submit(pd.DataFrame({TEXT_COLUMN: texts}), np.asarray(intents, dtype=object))

    def _copy_recommendations(self, user_ids: list[Any], k: int, ranked: list[list[Any]]) -> None:
        assert self.mirror is not None
        answers = np.empty(len(ranked), dtype=object)
        answers[:] = [tuple(items) for items in ranked]  # one tuple per user, whatever the lists' lengths
        self.mirror.submit(pd.DataFrame({USER_COLUMN: user_ids, K_COLUMN: k}), answers)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _score_batch(self, frames: list[pd.DataFrame]) -> list[np.ndarray]:
        """Score every waiting request's rows in one forward pass, then split the result back."""
        combined = pd.concat(frames, ignore_index=True)
        self.metrics.observe_batch(len(combined))
        assert self.model.predictor is not None  # only the classifier's routes score through here
        probabilities = self.model.predictor.predict_proba(combined)
        if self.mirror is not None:  # one copy per forward pass, sent after this returns
            self.mirror.submit(combined, self.model.predictor.labels(probabilities))
        offsets = np.cumsum([len(f) for f in frames])[:-1]
        return list(np.split(probabilities, offsets))


async def connect_to_shadow() -> ShadowCall:
    """The call that scores a frame on the shadow application of this Serve instance."""
    handle = await asyncio.to_thread(serve.get_app_handle, SHADOW_APP)  # asks the controller: not on the loop

    async def score_on_shadow(frame: pd.DataFrame) -> tuple[str, list[str]]:
        return cast(tuple[str, list[str]], await handle.score.remote(frame))
    return score_on_shadow


async def connect_to_canary() -> CanaryCall:
    """The call that has the canary application of this Serve instance answer a request."""
    handle = await asyncio.to_thread(serve.get_app_handle, CANARY_APP)

    async def answer_on_canary(request: ForwardedRequest) -> CanaryAnswer:
        return cast(CanaryAnswer, await handle.answer_forwarded.remote(request))
    return answer_on_canary


class ShadowScorer:
    """A replica of the shadow application: the challenger, answering only the champion's copies."""

    def __init__(self, model_uri: str, environment: dict[str, str], max_batch_size: int,
                 batch_wait_timeout_s: float) -> None:
        from keel.settings import load_settings

        os.environ.update(environment)
        self.model = load_registered(model_uri, load_settings())
        self._score_batch.set_max_batch_size(max_batch_size)  # type: ignore[attr-defined]
        self._score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)  # type: ignore[attr-defined]

    async def score(self, frame: pd.DataFrame) -> tuple[str, list[Any]]:
        if self.model.recommender is not None:  # one request's users, as the champion answered them unbatched
            return self.model.version, self.model.answers(frame)
        return self.model.version, await self._score_batch(frame)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _score_batch(self, frames: list[pd.DataFrame]) -> list[list[str]]:
        labels = self.model.answers(pd.concat(frames, ignore_index=True))
        offsets = np.cumsum([0, *(len(f) for f in frames)])
        return [labels[start:end] for start, end in zip(offsets[:-1], offsets[1:], strict=True)]


def serving_token(settings: KeelSettings, require_token: bool) -> str:
    """The bearer token clients must send, or empty when the server is open."""
    token = settings.serve_token.get_secret_value()
    if require_token and not token:
        raise ConfigError("require_token is on but KEEL_SERVE_TOKEN is empty: set it (the chart reads it "
                          "from the credentials Secret) or turn require_token off.")
    return token if require_token else ""


def _deployment_options(name: str, config: ServeConfig) -> dict[str, Any]:
    options: dict[str, Any] = {
        "name": name, "max_ongoing_requests": config.max_ongoing_requests,
        "max_queued_requests": config.max_queued_requests,
        # Back-pressure: a fast 503 with Retry-After rather than an ever longer queue
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=config.retry_after_s),
        "ray_actor_options": {"num_cpus": config.cpus_per_replica},
    }
    if config.min_replicas is not None and config.max_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
                                         "target_ongoing_requests": max(1, config.max_batch_size // 2)}
    else:
        options["num_replicas"] = config.replicas
    return options


def build_application(model_uri: str, config: ServeConfig) -> Any:
    """The bound Serve application: deployment options from ``config``."""
    from keel.settings import load_settings

    deployment = cast(Any, serve.deployment(ModelServer)).options(**_deployment_options("model", config))
    settings = load_settings()
    serving_token(settings, config.require_token)  # fail here, not in a replica that restarts forever
    return deployment.bind(model_uri, keel_environment(settings), config.max_batch_size,
                           config.batch_wait_timeout_s, config.require_token,
                           config.shadow.model_dump() if config.shadow else None,
                           config.canary.model_dump() if config.canary else None)


def build_shadow_application(model_uri: str, config: ServeConfig) -> Any:
    """The bound shadow application (replicas and batching from ``config``; its port and token go unused)."""
    from keel.settings import load_settings

    deployment = cast(Any, serve.deployment(ShadowScorer)).options(**_deployment_options(SHADOW_DEPLOYMENT, config))
    return deployment.bind(model_uri, keel_environment(load_settings()), config.max_batch_size,
                           config.batch_wait_timeout_s)


def deploy(model_uri: str, config: ServeConfig, shadow_uri: str | None = None,
           shadow_config: ServeConfig | None = None, canary_uri: str | None = None) -> str:
    """Run the application (and a shadow or canary beside it) on the connected Ray cluster; returns the base
    URL. A canary routes ``config.canary`` (CanaryConfig's defaults unless set) and runs with ServeConfig's
    defaults."""
    serve.start(http_options={"host": config.host, "port": config.port})
    if shadow_uri:
        config = config.copying_to_shadow()
        serve.run(build_shadow_application(shadow_uri, shadow_config or ServeConfig()), name=SHADOW_APP,
                  route_prefix=None, blocking=False)
    if canary_uri:
        config = config.routing_to_canary()
        serve.run(build_application(canary_uri, ServeConfig()), name=CANARY_APP, route_prefix=None, blocking=False)
    serve.run(build_application(model_uri, config), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{config.host}:{config.port}"


def application_builder(args: dict[str, Any]) -> Any:
    """Entry point for Serve config files, the REST API and RayService ``serveConfigV2``."""
    return build_application(args["model_uri"], ServeConfig.model_validate(args.get("config", {})))


def shadow_application_builder(args: dict[str, Any]) -> Any:
    """Entry point of the shadow application (:func:`keel.serve.shadow.shadow_application`)."""
    return build_shadow_application(args["model_uri"], ServeConfig.model_validate(args.get("config", {})))
