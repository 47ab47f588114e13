"""Keel's Kubernetes side: what pipeline steps read, the served model's rollout, and ``keel status``.

The chart (helm/keel) creates a ConfigMap with every endpoint and reads
credentials from an existing Secret; :func:`attach_cluster_config` wires both
into each pipeline step with the ``kfp.kubernetes`` helpers. Serving on a
cluster is a KubeRay ``RayService``: a new champion is rolled out by patching
its ``serveConfigV2`` (KubeRay then updates the Serve app in place, without
dropping requests), which is all the pipeline runner's Role may change.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from typing import Any

import yaml

from keel.errors import ClusterError
from keel.serve.challenger import CANARY_APP, SHADOW_APP
from keel.settings import KeelSettings
from keel.submit import DEFAULT_SERVICE_ACCOUNT as DEFAULT_RUNNER

CONFIG_MAP = "keel-config"
CREDENTIALS_SECRET = "keel-credentials"
# Keys of the chart's ConfigMap (a test compares them with the rendered chart).
CONFIG_MAP_KEYS = ("KEEL_MLFLOW_TRACKING_URI", "KEEL_EXPERIMENT_NAME", "KEEL_S3_ENDPOINT", "KEEL_S3_REGION",
                   "KEEL_ARTIFACT_ROOT", "MLFLOW_S3_ENDPOINT_URL", "KEEL_RAY_ADDRESS", "KEEL_RAY_AUTOSCALING",
                   "KEEL_RAY_MAX_GPUS", "KEEL_RAY_SERVICE", "KEEL_KUBE_NAMESPACE", "KEEL_KFP_HOST",
                   "KEEL_PUSHGATEWAY_URL", "KEEL_HOME", "MLFLOW_TRACKING_USERNAME")
# Secret key -> variable: S3 credentials for Keel and boto3 (MLflow), required.
S3_CREDENTIALS = {"s3-access-key": "KEEL_S3_ACCESS_KEY", "s3-secret-key": "KEEL_S3_SECRET_KEY"}
# Optional ones: Ray's token for the Job Submission API, MLflow's password when its auth app is on.
RAY_TOKEN = {"ray-auth-token": "RAY_AUTH_TOKEN"}
MLFLOW_PASSWORD = {"mlflow-admin-password": "MLFLOW_TRACKING_PASSWORD"}
PSEUDONYM_KEY = {"pseudonym-key": "KEEL_PSEUDONYM_KEY"}  # customer_service_intents' user-id pseudonyms
RAY_GROUP, RAY_VERSION = "ray.io", "v1"
APP_NAME = "keel"


def attach_cluster_config(task: Any, config_map: Any = CONFIG_MAP, secret: Any = CREDENTIALS_SECRET) -> Any:
    """Endpoints from the ConfigMap, credentials from the Secret, as env on a KFP task."""
    from kfp import kubernetes

    kubernetes.use_config_map_as_env(task, config_map, {key: key for key in CONFIG_MAP_KEYS}, optional=True)
    kubernetes.use_secret_as_env(task, secret, S3_CREDENTIALS)
    kubernetes.use_secret_as_env(task, secret, {**RAY_TOKEN, **MLFLOW_PASSWORD, **PSEUDONYM_KEY}, optional=True)
    return task


def _load_kube_config() -> None:
    from kubernetes import config
    from kubernetes.config.config_exception import ConfigException

    try:
        config.load_incluster_config()
    except ConfigException:
        try:
            config.load_kube_config()
        except (ConfigException, OSError) as e:
            raise ClusterError("no Kubernetes configuration: not running in a pod, and no usable kubeconfig "
                               f"({e}). Set KUBECONFIG or run inside the cluster.") from e


# Kubernetes names the caller in a refusal: User "system:serviceaccount:NAMESPACE:NAME" cannot patch ...
REFUSED_ACCOUNT = re.compile(r'system:serviceaccount:([^:"\\\s]+):([^"\\\s]+)')


def _api_error(action: str, error: Any) -> ClusterError:
    status = getattr(error, "status", None)
    hint = {403: _refusal_hint(str(getattr(error, "body", "") or "")),
            404: " Is the chart installed in this namespace (KEEL_KUBE_NAMESPACE)?"}.get(status or 0, "")
    return ClusterError(f"{action}: Kubernetes answered {status} {getattr(error, 'reason', error)}.{hint}")


def _refusal_hint(body: str) -> str:
    """Which account was refused, and the usual reason: a run started without Keel's runner account (the
    Kubeflow UI's run form leaves "Service Account" empty, so KFP's default account runs the steps)."""
    refused = REFUSED_ACCOUNT.search(body)
    if refused is None or refused.group(2) == DEFAULT_RUNNER:
        return (" The pipeline runner's Role allows only what the chart grants (helm/keel/templates/rbac.yaml); "
                "is this namespace among the chart's pipelineRunner.namespaces?")
    return (f" This step runs as ServiceAccount {refused.group(2)} (namespace {refused.group(1)}), which the chart "
            f"grants nothing; start the run as {DEFAULT_RUNNER} (`keel submit` does; in the Kubeflow UI, fill in "
            "the run's Service Account).")


def _require(settings: KeelSettings, *fields: str) -> None:
    missing = [f"KEEL_{f.upper()}" for f in fields if not getattr(settings, f)]
    if missing:
        raise ClusterError(f"{', '.join(missing)} not set. Pipeline steps and Ray pods read them from the chart's "
                           "ConfigMap keel-config; from your own machine, export them as it holds them "
                           "(KEEL_KUBE_NAMESPACE is the release's namespace, e.g. `helm install keel helm/keel -n keel`"
                           " gives keel).")


def rolled_serve_config(serve_config_v2: str, model_uri: str,
                        same_version: Callable[[str, str], bool] | None = None) -> str:
    """The RayService's Serve config with the Keel app's model swapped, every other setting kept but a
    shadow or canary that serves the new champion's version (``same_version`` says which): it has graduated."""
    from keel.serve.challenger import without_challengers_serving

    document = yaml.safe_load(serve_config_v2) or {}
    applications = [a for a in document.get("applications", []) if a.get("name") == APP_NAME]
    if not applications:
        raise ClusterError(f"the RayService's serveConfigV2 has no {APP_NAME!r} application to roll.")
    applications[0].setdefault("args", {})["model_uri"] = model_uri
    if same_version is not None:
        document["applications"] = without_challengers_serving(document["applications"], APP_NAME, model_uri,
                                                                 same_version)
    return yaml.safe_dump(document, sort_keys=False)


def rayservice_patch(current: dict[str, Any], model_uri: str,
                     same_version: Callable[[str, str], bool] | None = None) -> dict[str, Any]:
    """The merge patch that rolls ``current`` (a RayService) to ``model_uri``."""
    return {"spec": {"serveConfigV2": rolled_serve_config(current["spec"]["serveConfigV2"], model_uri,
                                                          same_version)}}


def served_model_uri(service: dict[str, Any]) -> str | None:
    """The model URI a RayService's Keel application serves (None without one)."""
    for application in (yaml.safe_load(service["spec"].get("serveConfigV2", "")) or {}).get("applications", []):
        if application.get("name") == APP_NAME:
            return str(application.get("args", {}).get("model_uri", "")) or None
    return None


def roll_served_model(settings: KeelSettings, model_uri: str) -> str:
    """Point the RayService at ``model_uri``; returns the in-cluster URL of the serving API."""
    url = _roll(settings, model_uri, only_model=None)
    if url is None:  # cannot happen without only_model; kept for the type checker
        raise ClusterError(f"RayService {settings.ray_service} was not rolled to {model_uri}.")
    return url


def roll_if_serving(settings: KeelSettings, model_uri: str, model_name: str) -> str | None:
    """Roll the RayService to ``model_uri`` only if it serves ``model_name`` now; its URL, or None."""
    return _roll(settings, model_uri, only_model=model_name)


ROLL_TIMEOUT_S = 600.0  # new replicas may wait for a node, then load the model from the artifact store


def _roll(settings: KeelSettings, model_uri: str, only_model: str | None) -> str | None:
    from keel.tracking import same_registered_version

    same_version = partial(same_registered_version, settings=settings)
    return _patch_until_running(settings, f"rolling RayService {settings.ray_service} to {model_uri}", only_model,
                                lambda current: rayservice_patch(current, model_uri, same_version), model_uri)


def _patch_until_running(settings: KeelSettings, action: str, only_model: str | None,
                         patch_for: Callable[[dict[str, Any]], dict[str, Any]], model_uri: str,
                         app: str = APP_NAME) -> str | None:
    """Patch the RayService, then wait until Serve runs ``model_uri`` as ``app`` there. The patch alone was taken
    for a deploy: a model whose replicas failed to start left the step succeeded and the new version champion.
    On failure the Serve config from before the patch is put back, and the error says so."""
    from keel.serve.control import ServeError, wait_until_running

    before: dict[str, str] = {}

    def remembering(current: dict[str, Any]) -> dict[str, Any]:
        before["serveConfigV2"] = current["spec"]["serveConfigV2"]
        return patch_for(current)

    url = _patch_serve_config(settings, action, only_model, remembering)
    if url is None:
        return None
    try:
        wait_until_running(settings.serve_dashboard_url, ROLL_TIMEOUT_S, model_uri=model_uri, app=app)
    except ServeError as failed:
        _patch_serve_config(settings, f"putting RayService {settings.ray_service}'s Serve config back", None,
                            lambda _: {"spec": {"serveConfigV2": before["serveConfigV2"]}})
        raise ServeError(f"{str(failed).rstrip('.')}. RayService {settings.ray_service}'s Serve config is back as it "
                         f"was, serving {served_model_uri({'spec': before})}.") from failed
    return url


def withdrawn_rayservice_patch(current: dict[str, Any], model_uri: str,
                               same_version: Callable[[str, str], bool]) -> dict[str, Any]:
    """The merge patch that removes ``current``'s shadow or canary serving ``model_uri``'s version, and the
    champion's setting for it; {} when none serves it."""
    from keel.serve.challenger import without_challengers_serving

    applications = (yaml.safe_load(current["spec"]["serveConfigV2"]) or {}).get("applications", [])
    kept = without_challengers_serving(applications, APP_NAME, model_uri, same_version)
    return applications_patch(current, lambda _: kept) if len(kept) < len(applications) else {}


def withdraw_challengers(settings: KeelSettings, model_uri: str, model_name: str) -> str | None:
    """Remove the RayService's shadow or canary serving ``model_uri``'s version, if the RayService serves
    ``model_name``; its URL when one was removed, else None."""
    from keel.tracking import same_registered_version

    same_version = partial(same_registered_version, settings=settings)
    return _patch_serve_config(settings, f"withdrawing {model_uri} from RayService {settings.ray_service}",
                               model_name, lambda current: withdrawn_rayservice_patch(current, model_uri, same_version))


def applications_patch(current: dict[str, Any],
                       change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> dict[str, Any]:
    """The merge patch that replaces ``current``'s (a RayService's) Serve applications with ``change`` of them."""
    document = yaml.safe_load(current["spec"]["serveConfigV2"]) or {}
    document["applications"] = change(document.get("applications", []))
    return {"spec": {"serveConfigV2": yaml.safe_dump(document, sort_keys=False)}}


def preview_served_model(settings: KeelSettings, model_uri: str,
                         beside_champion: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
                         app: str) -> str | None:
    """Serve ``model_uri`` as ``app`` beside the RayService's champion (``beside_champion`` adds it as shadow or
    canary) if the RayService serves that model, once Serve runs it; its URL, or None."""
    from keel.tracking import registered_name

    return _patch_until_running(settings, f"serving {model_uri} beside the champion of RayService "
                                f"{settings.ray_service}", registered_name(model_uri) or "",
                                lambda current: applications_patch(current, beside_champion), model_uri, app)


def _patch_serve_config(settings: KeelSettings, action: str, only_model: str | None,
                        patch_for: Callable[[dict[str, Any]], dict[str, Any]]) -> str | None:
    """Patch the RayService (if it serves ``only_model``, when given); its in-cluster URL, or None when it
    serves another model or the patch is empty (nothing to change)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from keel.tracking import registered_name

    _require(settings, "ray_service", "kube_namespace")
    _load_kube_config()
    api = client.CustomObjectsApi()
    name, namespace = settings.ray_service, settings.kube_namespace
    try:
        current = api.get_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, "rayservices", name)
        if only_model is not None and registered_name(served_model_uri(current)) != only_model:
            return None
        patch = patch_for(current)
        if not patch:
            return None
        api.patch_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, "rayservices", name, patch)
    except ApiException as e:
        raise _api_error(f"{action} in namespace {namespace}", e) from e
    return f"http://{name}-serve-svc.{namespace}.svc.cluster.local:8000"


def _condition(status: dict[str, Any], kind: str) -> str:
    for condition in status.get("conditions", []) or []:
        if condition.get("type") == kind:
            return str(condition.get("status"))
    return "?"


def _serving_detail(service: dict[str, Any]) -> str:
    """What a RayService serves: its model, and a shadow's or a canary's (with the canary's share)."""
    applications = {a.get("name"): a.get("args", {}) for a in (yaml.safe_load(
        service["spec"].get("serveConfigV2", "")) or {}).get("applications", [])}
    detail = f"serving {applications.get(APP_NAME, {}).get('model_uri') or '?'}"
    shadow, canary = (applications.get(app, {}).get("model_uri") for app in (SHADOW_APP, CANARY_APP))
    if shadow:
        detail += f", shadow {shadow}"
    if canary:
        weight = ((applications.get(APP_NAME, {}).get("config") or {}).get("canary") or {}).get("weight")
        detail += f", canary {canary}" + (f" answering {weight:.0%}" if isinstance(weight, float | int) else "")
    return detail


def summarize(ray_clusters: list[dict[str, Any]], ray_services: list[dict[str, Any]],
              workloads: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per resource: kind, name, state, detail; from the objects as the API returns them."""
    rows = []
    for cluster in ray_clusters:
        status = cluster.get("status", {}) or {}
        rows.append({"kind": "RayCluster", "name": cluster["metadata"]["name"],
                     "state": str(status.get("state", _condition(status, "Ready"))),
                     "detail": f"workers {status.get('availableWorkerReplicas', 0)}/"
                               f"{status.get('desiredWorkerReplicas', 0)}"})
    for service in ray_services:
        status = service.get("status", {}) or {}
        rows.append({"kind": "RayService", "name": service["metadata"]["name"],
                     "state": str(status.get("serviceStatus") or f"Ready={_condition(status, 'Ready')}"),
                     "detail": _serving_detail(service)})
    for workload in workloads:
        status, spec = workload.get("status", {}) or {}, workload.get("spec", {})
        ready, wanted = status.get("readyReplicas", 0) or 0, spec.get("replicas", 1)
        rows.append({"kind": workload["kind"], "name": workload["metadata"]["name"],
                     "state": "Ready" if ready >= wanted else "NotReady", "detail": f"replicas {ready}/{wanted}"})
    return rows


def cluster_status(settings: KeelSettings) -> list[dict[str, str]]:
    """Keel's Ray clusters, Ray services, MLflow, MinIO, PostgreSQL and Pushgateway in ``KEEL_KUBE_NAMESPACE``."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    _require(settings, "kube_namespace")
    _load_kube_config()
    namespace, selector = settings.kube_namespace, "app.kubernetes.io/part-of=keel"
    custom, apps = client.CustomObjectsApi(), client.AppsV1Api()
    try:
        clusters = custom.list_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, "rayclusters",
                                                        label_selector=selector)["items"]
        services = custom.list_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, "rayservices",
                                                        label_selector=selector)["items"]
        workloads = [{**client.ApiClient().sanitize_for_serialization(item), "kind": kind}
                     for kind, listing in (("Deployment", apps.list_namespaced_deployment),
                                           ("StatefulSet", apps.list_namespaced_stateful_set))
                     for item in listing(namespace, label_selector=selector).items]
    except ApiException as e:
        raise _api_error(f"reading Keel's resources in namespace {namespace}", e) from e
    except (HTTPError, OSError) as e:  # an API server that does not answer
        raise ClusterError(f"cannot reach the Kubernetes API server: {e}") from e
    return summarize(clusters, services, workloads)
