"""What a Serve config document holds: the settings of a served model, of its shadow and canary, and the
applications they become.

These are the parts that run outside a replica: ``keel serve`` and ``keel models promote|reject`` write and
read the config through Ray's REST API, the deploy step rolls it, and the chart's RayService holds the same
document. Kept apart from :mod:`keel.serve.deployment` (Ray Serve, pandas, NumPy) and the shadow's and
canary's runtime (FastAPI, Prometheus), so that ``keel serve status`` and ``keel serve stop`` start in a
fraction of a second instead of over one.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from keel.serve.challenger import CANARY_APP, SERVER_BUILDER, SHADOW_APP, challenger_application, with_challenger
from keel.settings import KeelSettings

PORTS = (1, 65535)  # what a TCP port may be: ServeConfig, `--param serve_port` and the deploy step hold to it

APP_NAME = "keel"
SHADOW_BUILDER = "keel.serve.deployment:shadow_application_builder"
# Ray Serve's throughput-optimized ingress: HAProxy in front of the replicas
# (Ray >= 2.55). It must be in the environment before Ray starts.
HAPROXY_ENVIRONMENT = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# Ray on this machine: a stopping replica stays reachable for 2 s, not Ray's 30. Ray holds it that long for load
# balancers outside Ray (a cloud one) to deregister it; here Serve's own HAProxy is the only one, and it retries
# a replica that has stopped accepting on another. `keel serve stop` took 35 s, and a roll kept the old replicas'
# CPUs for 30 s.
LOCAL_DRAIN_ENVIRONMENT = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


class ShadowConfig(BaseModel):
    """How the champion copies the rows it scores to the shadow application."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sample: float = Field(default=1.0, gt=0, le=1, description="share of forward passes copied to the shadow")
    max_in_flight: int = Field(default=32, ge=1, description="copies awaiting the shadow per replica; more skip")
    timeout_s: float = Field(default=2.0, gt=0, description="a copy not answered by then counts as failed")


class CanaryConfig(BaseModel):
    """Which share of the champion's scoring requests the canary answers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    weight: float = Field(default=0.1, gt=0, lt=1, description="share of scoring requests the canary answers")
    timeout_s: float = Field(default=2.0, gt=0, description="after this, the champion answers instead")


class ServeConfig(BaseModel):
    """Replicas, batching and back-pressure for one served model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    port: int = Field(default=8000, ge=PORTS[0], le=PORTS[1])
    host: str = "127.0.0.1"
    replicas: int = Field(default=1, ge=1)
    min_replicas: int | None = Field(default=None, ge=0, description="with max_replicas: autoscale")
    max_replicas: int | None = Field(default=None, ge=1)
    max_batch_size: int = Field(default=32, ge=1)
    batch_wait_timeout_s: float = Field(default=0.002, ge=0)
    max_ongoing_requests: int = Field(default=64, ge=1)
    max_queued_requests: int = Field(default=256, ge=1, description="beyond this, 503 with Retry-After")
    retry_after_s: float = Field(default=1.0, ge=0, description="Retry-After on a 503 from back-pressure")
    cpus_per_replica: float = Field(default=1.0, gt=0)
    require_token: bool = Field(default=False, description="401 without 'Authorization: Bearer $KEEL_SERVE_TOKEN'")
    shadow: ShadowConfig | None = Field(default=None, description="copy scored rows to the keel-shadow app")
    canary: CanaryConfig | None = Field(default=None, description="route a share of requests to keel-canary")

    def copying_to_shadow(self) -> ServeConfig:
        """This config with the champion copying its rows to a shadow (ShadowConfig's defaults unless set)."""
        return self.model_copy(update={"shadow": self.shadow or ShadowConfig()})

    def routing_to_canary(self) -> ServeConfig:
        """This config with the champion routing requests to a canary (CanaryConfig's defaults unless set)."""
        return self.model_copy(update={"canary": self.canary or CanaryConfig()})


def shadow_application(model_uri: str, config: dict[str, Any]) -> dict[str, Any]:
    """The Serve config of the shadow application: no route, so only the champion's replicas reach it."""
    return challenger_application(SHADOW_APP, SHADOW_BUILDER, model_uri, config)


def with_shadow(applications: list[dict[str, Any]], champion_app: str, shadow_uri: str) -> list[dict[str, Any]]:
    """The applications with ``shadow_uri`` as the shadow of ``champion_app``: a shadow already there keeps
    its settings and gets the new model; the champion starts copying (ShadowConfig's defaults) if it was not."""
    return with_challenger(applications, champion_app, shadow_application(shadow_uri, {}),
                           ShadowConfig().model_dump())


def canary_application(model_uri: str, config: dict[str, Any]) -> dict[str, Any]:
    """The Serve config of the canary: a Keel model server with no route, reached only by the champion."""
    return challenger_application(CANARY_APP, SERVER_BUILDER, model_uri, config)


def with_canary(applications: list[dict[str, Any]], champion_app: str, canary_uri: str,
                routing: CanaryConfig) -> list[dict[str, Any]]:
    """The applications with ``canary_uri`` answering ``routing.weight`` of ``champion_app``'s requests; a
    canary already there keeps its serving settings and gets the new model and weight."""
    applications = with_challenger(applications, champion_app, canary_application(canary_uri, {}), {})
    for application in applications:
        if application.get("name") == champion_app:
            application["args"]["config"]["canary"] = routing.model_dump()
    return applications


def local_haproxy_environment() -> dict[str, str]:
    """What a Ray started on this machine needs for the HAProxy ingress; a drain period set by hand stays."""
    drain = {name: os.environ.get(name, value) for name, value in LOCAL_DRAIN_ENVIRONMENT.items()}
    return {**HAPROXY_ENVIRONMENT, **drain}


def keel_environment(settings: KeelSettings) -> dict[str, str]:
    """What a replica needs to reach the same registry and S3 endpoint, paths made absolute.

    Replicas run in Ray worker processes with their own working directory, so a
    relative default such as ``./.keel`` would point somewhere else there.
    """
    environment = {k: v for k, v in os.environ.items() if k.startswith(("KEEL_", "MLFLOW_", "AWS_"))}
    environment.update(KEEL_HOME=str(settings.home), KEEL_ARTIFACT_ROOT=settings.artifact_root,
                       KEEL_MLFLOW_TRACKING_URI=settings.mlflow_tracking_uri)
    return environment
