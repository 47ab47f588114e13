"""The one configuration object: it decides local or cluster mode.

Everything comes from ``KEEL_*`` environment variables (a ConfigMap and a
Secret on a cluster), so a component, a Ray worker and the CLI all see the
same values without passing them around. Nothing is read or created at import
time: call :func:`load_settings` where the values are needed.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from keel.errors import ConfigError

# Ray's system config for every Ray instance Keel starts on this machine (a step's private Ray, `keel serve`'s
# head). Ray starts its workers at nice 15, below everything else, so any busy process on the machine takes
# their CPU, and they are the work: training, trials, scoring, model replicas. Beside two busy loops, a
# training run of 18 s took 198 s at nice 15 and 31 s at the caller's priority. (A cluster's Ray is the
# chart's to configure.)
LOCAL_RAY_SYSTEM_CONFIG = {"worker_niceness": 0}
# A step's private Ray, on top: no idle workers started for the first driver. In a training run neither of the
# two it started ever ran a task (Ray Train's actors started workers of their own), and they cost a CPU-second
# in every step that trains, tunes or scores.
STEP_RAY_SYSTEM_CONFIG = {**LOCAL_RAY_SYSTEM_CONFIG, "prestart_worker_first_driver": False}


class KeelSettings(BaseSettings):
    """Endpoints and locations, each overridable with ``KEEL_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="KEEL_", frozen=True, extra="forbid")

    home: Path = Field(
        default=Path(".keel"),
        description="Local state directory; relative paths resolve against the working directory.",
    )
    artifact_root: str = Field(
        default="",
        description="Where stage outputs live: a directory or s3://bucket/prefix. Default: <home>/artifacts.",
    )
    mlflow_tracking_uri: str = Field(
        default="",
        description="MLflow tracking URI. Default: SQLite at <home>/mlflow.db.",
    )
    experiment_name: str = Field(
        default="",
        description="MLflow experiment for every pipeline run. Empty: each pipeline's own, named after it "
                    "(medical_diagnosis, ...); a retraining pipeline's runs join the pipeline they retrain.",
    )
    s3_endpoint: str = Field(
        default="",
        description="S3 API endpoint URL (MinIO, moto, AWS), e.g. http://minio:9000. Empty: AWS default.",
    )
    s3_access_key: SecretStr = Field(default=SecretStr(""), description="S3 access key id.")
    s3_secret_key: SecretStr = Field(default=SecretStr(""), description="S3 secret access key.")
    s3_region: str = Field(default="us-east-1", description="S3 region name.")
    ray_address: str = Field(
        default="",
        description="Ray cluster address (ray://host:10001 or auto). Empty: start a local Ray.",
    )
    ray_autoscaling: bool = Field(
        default=True,
        description="Whether the cluster at KEEL_RAY_ADDRESS adds worker nodes for requests that wait (KubeRay's "
                    "autoscaler; the chart sets it). False: a request beyond the nodes up now fails at once.",
    )
    ray_max_gpus: int | None = Field(
        default=None, ge=0,
        description="The most GPUs the cluster at KEEL_RAY_ADDRESS can grow to (the chart sums its worker groups). "
                    "A run asking for more fails at once. Unset: unknown, so such a run waits for the autoscaler.",
    )
    ray_dashboard_url: str = Field(
        default="",
        description="Ray dashboard URL for the Serve REST API (http://head:8265). Empty: a local head.",
    )
    pushgateway_url: str = Field(
        default="", description="Prometheus Pushgateway (host:port or URL) for pipeline stage metrics. Empty: off.")
    kfp_host: str = Field(default="", description="Kubeflow Pipelines API endpoint (cluster mode).")
    image: str = Field(default="", description="Runtime image the pipeline steps run (keel submit, schedule, "
                                               "pipelines compile; --image), built with `make image IMAGE=...`. "
                                               "Empty: ghcr.io/keel-mlops/keel-runtime:<version>.")
    kfp_namespace: str = Field(default="", description="Profile namespace on a multi-user Kubeflow, where runs, "
                                                        "experiments and step pods live (--namespace). Empty: "
                                                        "standalone KFP, or the notebook's own namespace.")
    kfp_token: SecretStr = Field(default=SecretStr(""),
                                 description="Bearer token for the KFP API (e.g. a ServiceAccount token in CI).")
    serve_token: SecretStr = Field(default=SecretStr(""),
                                   description="Bearer token the serving API requires when require_token is on.")
    pseudonym_key: SecretStr = Field(default=SecretStr(""),
                                     description="HMAC key for pseudonymous user ids. Empty: a random key kept "
                                                 "in <home>/pseudonym.key (set it on a cluster, from a Secret).")
    kube_namespace: str = Field(default="", description="Namespace of Keel's cluster resources (the chart sets it).")
    ray_service: str = Field(default="", description="RayService serving the champion; when set, deploy patches it.")
    git_commit: str = Field(
        default="",
        description="Commit to tag runs with. Empty: ask git in the working directory.",
    )

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        # Ray workers and KFP subprocesses may run elsewhere: pin the path now.
        return value.expanduser().resolve()

    @field_validator("s3_endpoint")
    @classmethod
    def _endpoint_has_scheme(cls, value: str) -> str:
        if value and urlparse(value).scheme not in ("http", "https"):
            raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _fill_defaults(self) -> KeelSettings:
        if not self.artifact_root:
            object.__setattr__(self, "artifact_root", str(self.home / "artifacts"))
        elif "://" not in self.artifact_root:
            object.__setattr__(self, "artifact_root", str(Path(self.artifact_root).expanduser().resolve()))
        object.__setattr__(self, "artifact_root", self.artifact_root.rstrip("/"))
        if not self.mlflow_tracking_uri:
            object.__setattr__(self, "mlflow_tracking_uri", self.local_tracking_uri)
        return self

    @property
    def local_tracking_uri(self) -> str:
        """Keel's own MLflow store under ``home``: the tracking URI unless KEEL_MLFLOW_TRACKING_URI names another."""
        return f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def ray_can_grow(self) -> bool:
        """A request beyond the Ray nodes up now may still be placed: a cluster whose autoscaler adds the nodes it
        waits for (the chart's GPU group starts at zero). A local Ray gets no new nodes, so it should fail fast."""
        return bool(self.ray_address) and self.ray_autoscaling

    @property
    def serve_dashboard_url(self) -> str:
        """Where Serve's REST API is: KEEL_RAY_DASHBOARD_URL, else the head of the chart's RayService
        (KEEL_RAY_SERVICE: KubeRay's ``<name>-head-svc``), else the dashboard of the Ray head at KEEL_RAY_ADDRESS
        (a KubeRay head service serves ray:// on 10001 and the dashboard on 8265), else empty for a local head.
        With the chart's config KEEL_RAY_ADDRESS is the training cluster's head, which serves nothing."""
        if self.ray_dashboard_url:
            return self.ray_dashboard_url.rstrip("/")
        if self.ray_service and self.kube_namespace:
            return f"http://{self.ray_service}-head-svc.{self.kube_namespace}.svc.cluster.local:8265"
        if self.ray_address.startswith(("http://", "https://")):  # a Job Submission address is the dashboard
            return self.ray_address.rstrip("/")
        address = urlparse(self.ray_address) if self.ray_address.startswith("ray://") else None
        return f"http://{address.hostname}:8265" if address and address.hostname else ""

    def s3_environment(self) -> dict[str, str]:
        """Environment variables that make MLflow and boto3 talk to our S3 endpoint."""
        env = {"AWS_DEFAULT_REGION": self.s3_region}
        if self.s3_endpoint:
            env["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint
            env["AWS_ENDPOINT_URL_S3"] = self.s3_endpoint
        if self.s3_access_key.get_secret_value():
            env["AWS_ACCESS_KEY_ID"] = self.s3_access_key.get_secret_value()
            env["AWS_SECRET_ACCESS_KEY"] = self.s3_secret_key.get_secret_value()
        return env


def misnamed_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """``KEEL_*`` variables that name no setting but nearly name one, with that one: pydantic-settings ignores
    unknown names, so a guessed ``KEEL_MLFLOW_URI`` would leave runs on the local SQLite store without a word.
    Near: a word left out (all its words are in the setting's) or a typo; other names (tools' own) pass."""
    fields = list(KeelSettings.model_fields)
    found = {}
    for variable in environ:
        name = variable[len("KEEL_"):].lower() if variable.startswith("KEEL_") else ""
        if not name or name in fields:
            continue
        words = set(name.split("_"))
        near = [f for f in fields if words < set(f.split("_"))] or difflib.get_close_matches(name, fields, 1, 0.85)
        if near:
            found[variable] = f"KEEL_{near[0].upper()}"
    return found


def make_directory(path: Path) -> Path:
    """``path`` created if need be; a ConfigError naming it and the setting to change when it cannot be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{path}: cannot create this directory ({e.strerror or e}). Point KEEL_HOME (where Keel "
                          "keeps runs, logs and the local MLflow store) at a directory you can write.") from e
    return path


def load_settings(**overrides: object) -> KeelSettings:
    """Read ``KEEL_*`` from the environment, turning bad values into a ConfigError."""
    for variable, setting in misnamed_variables(os.environ).items():
        warnings.warn(f"{variable} is not a Keel setting, so it is ignored; did you mean {setting}?", stacklevel=2)
    try:
        return KeelSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as e:
        problems = "; ".join(
            f"KEEL_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"Invalid Keel settings: {problems}") from e


def export_s3_environment(settings: KeelSettings) -> None:
    """Make libraries that read AWS_* variables (MLflow, boto3) use Keel's S3 endpoint."""
    os.environ.update(settings.s3_environment())
