"""Deploy, inspect and stop served models through Ray Serve's REST API.

The same API a KubeRay head service exposes (``/api/serve/applications/`` on
the dashboard port), so ``keel serve --detach`` on a laptop and ``keel serve``
against a cluster go through one code path. Locally, a Ray head is started
with ``ray start`` so the model keeps serving after the command exits.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from functools import partial
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keel.errors import ConfigError, KeelError
from keel.serve.challenger import CANARY_APP, SERVER_BUILDER, SHADOW_APP, without_challengers_serving
from keel.serve.config import (APP_NAME, PORTS, CanaryConfig, ServeConfig, canary_application, keel_environment,
                               local_haproxy_environment, shadow_application, with_canary, with_shadow)
from keel.settings import LOCAL_RAY_SYSTEM_CONFIG, KeelSettings

if TYPE_CHECKING:
    from keel.config import RegisterConfig

APPLICATIONS = "/api/serve/applications/"
BUILDER = SERVER_BUILDER
REQUEST_TIMEOUT_S = 30
LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadPorts:
    """The fixed ports a ``ray start --head`` listens on; Ray's defaults, which a second head on the machine
    must change (the other ports Ray picks free itself)."""

    dashboard: int = 8265
    client_server: int = 10001  # ray://
    dashboard_agent: int = 52365


class ServeError(KeelError):
    """Ray Serve could not be reached or refused the request."""


def ray_auth_headers() -> dict[str, str]:
    """Ray's dashboard token, found where Ray's own clients look: RAY_AUTH_TOKEN,
    the file at RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (Ray >= 2.52 enables token auth)."""
    token = os.environ.get("RAY_AUTH_TOKEN", "")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _call(method: str, url: str, payload: Any = None) -> Any:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **ray_auth_headers()})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:  # noqa: S310
            body = response.read()
    except urllib.error.HTTPError as e:
        raise ServeError(f"{method} {url}: Ray answered HTTP {e.code}: {e.read().decode(errors='replace')[:500]}") from e
    except (urllib.error.URLError, OSError) as e:
        raise ServeError(f"{url}: cannot reach the Ray dashboard ({getattr(e, 'reason', e)}). Is Ray running? "
                         "Start one with `keel serve --detach`, or set KEEL_RAY_DASHBOARD_URL.") from e
    return json.loads(body) if body.strip() else None


def serve_config_document(model_uri: str, config: ServeConfig, shadow_uri: str | None = None,
                          shadow_config: ServeConfig | None = None, canary_uri: str | None = None,
                          canary_config: ServeConfig | None = None) -> dict[str, Any]:
    """The Serve config (as in a RayService's ``serveConfigV2``) for one model, and a shadow or a canary (with
    ``config.canary``'s routing, CanaryConfig's defaults unless set) beside it."""
    if shadow_uri:
        config = config.copying_to_shadow()
    if canary_uri:
        config = config.routing_to_canary()
    applications = [{"name": APP_NAME, "route_prefix": "/", "import_path": BUILDER,
                     "args": {"model_uri": model_uri, "config": config.model_dump()}}]
    if shadow_uri:
        applications.append(shadow_application(shadow_uri, (shadow_config or ServeConfig()).model_dump()))
    if canary_uri:
        applications.append(canary_application(canary_uri, (canary_config or ServeConfig()).model_dump()))
    return {"http_options": {"host": config.host, "port": config.port}, "applications": applications}


def deploy_rest(dashboard_url: str, model_uri: str, config: ServeConfig, shadow_uri: str | None = None,
                canary_uri: str | None = None) -> dict[str, Any]:
    """Replace what the Serve instance runs (challengers included) with ``model_uri`` and, given, its shadow
    or canary; returns the Serve config it sent."""
    document = serve_config_document(model_uri, config, shadow_uri, canary_uri=canary_uri)
    _call("PUT", dashboard_url.rstrip("/") + APPLICATIONS, document)
    return document


def status_rest(dashboard_url: str) -> dict[str, Any]:
    """Serve's view of the applications: status per application and deployment."""
    return dict(_call("GET", dashboard_url.rstrip("/") + APPLICATIONS) or {})


def stop_rest(dashboard_url: str) -> None:
    _call("DELETE", dashboard_url.rstrip("/") + APPLICATIONS)


def served_model_uri(application: dict[str, Any]) -> str | None:
    """The model URI an application of Serve's REST status is configured to serve (None when not Keel's)."""
    return (application.get("deployed_app_config") or {}).get("args", {}).get("model_uri")


def wait_until_running(dashboard_url: str, timeout_s: float = 180, model_uri: str | None = None,
                       app: str = APP_NAME, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Poll until application ``app`` is RUNNING (serving ``model_uri``, or with exactly ``args``, when
    given); a ServeError with Serve's message if it fails."""
    server = {SHADOW_APP: "the shadow model server", CANARY_APP: "the canary model server"}.get(app,
                                                                                               "the model server")
    deadline, application = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        application = status_rest(dashboard_url).get("applications", {}).get(app, {})
        state = application.get("status")
        deployed = (application.get("deployed_app_config") or {}).get("args")
        asked_for = model_uri in (None, served_model_uri(application)) and args in (None, deployed)
        if state == "RUNNING" and asked_for:
            return application
        if state in ("DEPLOY_FAILED", "UNHEALTHY") and asked_for:  # not the config before (KubeRay applies ours)
            raise ServeError(f"{server} failed to start: {_why_it_failed(_serve_messages(application, state))}")
        time.sleep(1)
    # Serve says why, e.g. a replica that waits for CPUs the Ray cluster does not have
    why = _serve_messages(application, "")
    raise ServeError(f"{server} was not RUNNING after {timeout_s:.0f} s{': ' + why[-1500:] if why else ''}; "
                     "see `keel serve status`.")


RAISED = re.compile(r"^\s*((?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception)\b:.*)$", re.MULTILINE)


def _why_it_failed(messages: str) -> str:
    """Serve's message for a replica whose constructor raised is the whole traceback, cut by the message's own
    limit; the exception it ends on says why, and the rest is Ray's and Keel's frames."""
    raised = RAISED.findall(messages)
    if not raised:
        return messages[-2000:]
    return f"{raised[-1].strip()[:1500]} (`keel serve status` shows Serve's whole message)"


def _serve_messages(application: dict[str, Any], default: str) -> str:
    details = [d.get("message", "") for d in application.get("deployments", {}).values()]
    return " ".join(m for m in [application.get("message", default), *details] if m)


def _ray_command() -> str:
    return shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"


def start_local_head(settings: KeelSettings, ports: HeadPorts = HeadPorts(), haproxy: bool = True) -> str:
    """``ray start --head`` on this machine, dashboard on 127.0.0.1; returns the dashboard URL.

    The head starts in a process group of its own, recorded in KEEL_HOME, so that
    :func:`stop_local_head` can end this head and nothing else of Ray's on the machine. A head recorded there
    and still alive is the one to deploy on: `ray start --head` would start a second Ray instance beside it,
    whose record replaced the first's, so that `keel serve stop` left the first one running.
    """
    record = _head_record(settings)
    if record.is_file():
        recorded = json.loads(record.read_text())
        if recorded.get("dashboard_port") == ports.dashboard and _is_ray_group(int(recorded["process_group"])):
            return f"http://127.0.0.1:{ports.dashboard}"
    environment = {**os.environ, **keel_environment(settings), **(local_haproxy_environment() if haproxy else {})}
    process = subprocess.Popen([_ray_command(), "start", "--head", "--port=0", "--dashboard-host=127.0.0.1",
                                f"--dashboard-port={ports.dashboard}",
                                f"--ray-client-server-port={ports.client_server}",
                                f"--dashboard-agent-listen-port={ports.dashboard_agent}", "--disable-usage-stats",
                                f"--system-config={json.dumps(LOCAL_RAY_SYSTEM_CONFIG)}"],
                               env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        end_process_group(process.pid)
        raise ServeError("`ray start --head` did not finish within 180 s") from None
    if process.returncode == 0:
        _head_record(settings).parent.mkdir(parents=True, exist_ok=True)
        _head_record(settings).write_text(json.dumps({"process_group": process.pid, "dashboard_port": ports.dashboard}))
    elif "already" not in stdout + stderr:
        raise ServeError(f"`ray start --head` failed: {(stderr or stdout)[-800:]}")
    return f"http://127.0.0.1:{ports.dashboard}"


def stop_local_head(settings: KeelSettings) -> bool:
    """End the Ray head that :func:`start_local_head` started, and only it; False when there was none.

    ``ray stop`` would end every Ray process on the machine, a ``keel run``'s
    training included.
    """
    record = _head_record(settings)
    if not record.is_file():
        return False
    group = int(json.loads(record.read_text())["process_group"])
    stopped = _is_ray_group(group) and end_process_group(group)
    record.unlink(missing_ok=True)
    return stopped


def _head_record(settings: KeelSettings) -> Path:
    return settings.home / "serve" / "ray-head.json"


def _is_ray_group(group: int) -> bool:
    """Whether a live process of ``group`` is Ray's (a recorded group id may have been reused since)."""
    proc = Path("/proc")
    if not proc.is_dir():  # no /proc (macOS): trust the record
        return _group_alive(group)
    for entry in proc.iterdir():
        try:
            if entry.name.isdigit() and os.getpgid(int(entry.name)) == group \
                    and b"ray" in (entry / "cmdline").read_bytes():
                return True
        except OSError:  # the process ended while we looked
            continue
    return False


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def end_process_group(group: int, grace_s: float = 5) -> bool:
    """SIGTERM the group, SIGKILL what is left after ``grace_s`` (as ``ray stop`` does, for one group)."""
    try:
        os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace_s
    while _group_alive(group) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group_alive(group):
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return True


def deploy_detached(model_uri: str, config: ServeConfig, settings: KeelSettings, haproxy: bool = True,
                    shadow_uri: str | None = None, canary_uri: str | None = None) -> str:
    """Serve ``model_uri`` (and a shadow or canary) on the cluster at KEEL_RAY_DASHBOARD_URL, or on a local Ray head
    started here.

    Returns once the applications are RUNNING, with the URL the model answers on.
    """
    dashboard = settings.serve_dashboard_url
    if not dashboard:
        refuse_a_port_held_elsewhere(config, settings)
        dashboard = start_local_head(settings, haproxy=haproxy)
    document = deploy_rest(dashboard, model_uri, config, shadow_uri, canary_uri)
    wait_until_running(dashboard, args=document["applications"][0]["args"])  # this config, not the one before
    for challenger in document["applications"][1:]:
        wait_until_running(dashboard, app=challenger["name"], args=challenger["args"])
    return f"http://{config.host}:{config.port}"


def refuse_a_port_held_elsewhere(config: ServeConfig, settings: KeelSettings) -> None:
    """Serving on a port another program listens on failed deep in Ray: its REST API answered HTTP 500 with a
    traceback. The port this machine's own Serve holds is no obstacle: the deploy rolls what it serves there."""
    if not port_in_use(config.host, config.port):
        return
    status = _serving_status(dashboard_url(settings), settings)
    if status.get("proxies") and (status.get("http_options") or {}).get("port") == config.port:
        return
    raise ServeError(f"port {config.port} on {config.host} is taken by another program, so Serve cannot listen "
                     "there: stop that program, or serve on another port (--port).")


def port_in_use(host: str, port: int) -> bool:
    """Whether something listens on ``host:port``. A port left in TIME_WAIT by a server just stopped is free, as
    it is to the next server: both bind with SO_REUSEADDR, as servers do."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def deploy_champion(model_uri: str, port: int, settings: KeelSettings) -> str:
    """The pipeline's deploy step: roll the chart's RayService on a cluster, else serve on this machine's Ray.

    Where the model is served already only the model changes: replicas, batching, token auth and a shadow or
    canary (unless it serves this version) stay as the chart or ``keel serve`` set them. A deploy that fails
    where the model was served leaves the champion that serves as champion
    (:func:`keel.registry.champion_back_after_failed_deploy`); a version no longer champion (a retry of this step
    after that, or another promotion since) is not deployed.
    """
    from keel.errors import ClusterError
    from keel.registry import champion_back_after_failed_deploy
    from keel.tracking import champion_version, mlflow_client, resolve_version

    if not PORTS[0] <= port <= PORTS[1]:  # the Kubeflow UI's run form takes any integer
        raise ConfigError(f"serve_port {port}: expected a port, {PORTS[0]} to {PORTS[1]}.")
    name, version = resolve_version(model_uri, settings)
    champion = champion_version(mlflow_client(settings), name)
    if champion != version:
        raise ServeError(f"{model_uri} is not champion now ({f'v{champion} is' if champion else 'none is'}), so "
                         "this step does not serve it: a failed deploy of it moved champion back, or a later "
                         "promotion replaced it. `keel models show` says which.")
    # the chart's RayService serves a model from the start; here, a head may serve none yet
    served_before = bool(settings.ray_service) or _served_here(name, settings) is not None
    try:
        return _serve_champion(model_uri, port, settings)
    except (ServeError, ClusterError, ConfigError) as e:
        back = champion_back_after_failed_deploy(name, version, str(e), settings, move_back=served_before)
        if back is None:
            raise
        raise type(e)(f"{str(e).rstrip('.')}. Champion is back at v{back}, which serves as before; v{version} "
                      f"stays challenger, tagged keel.deploy_failed. `keel models promote {name} {version} "
                      "--reason ...` tries it again.") from e


def _serve_champion(model_uri: str, port: int, settings: KeelSettings) -> str:
    from keel.tracking import registered_name

    if settings.ray_service:
        from keel.cluster import roll_served_model

        return roll_served_model(settings, model_uri)
    rolled = roll_if_serving(registered_name(model_uri) or "", model_uri, settings)
    if rolled is not None:
        return rolled
    host = "0.0.0.0" if settings.serve_dashboard_url else "127.0.0.1"  # a remote Ray head vs this machine
    return deploy_detached(model_uri, ServeConfig(port=port, host=host), settings)


def deploy_awaiting_approval(model_uri: str, registry: RegisterConfig, settings: KeelSettings) -> str | None:
    """The pipeline's deploy step for a version awaiting approval: serve it beside the champion that serves its
    model now (the chart's RayService, or this machine's Ray head) as that champion's shadow or canary
    (``registry.preview``), replacing any challenger of that kind. Returns the champion's URL, or None when
    nothing serves that model (a preview needs a champion whose traffic it shares)."""
    def beside_champion(applications: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if registry.preview == "canary":
            return with_canary(applications, APP_NAME, model_uri, CanaryConfig(weight=registry.canary_weight))
        return with_shadow(applications, APP_NAME, model_uri)

    app = CANARY_APP if registry.preview == "canary" else SHADOW_APP
    if settings.ray_service:
        from keel.cluster import preview_served_model

        url = preview_served_model(settings, model_uri, beside_champion, app)
    else:
        url = _preview_on_ray_head(model_uri, settings, beside_champion, app)
    if url is None:
        LOG.warning("%s awaits approval; nothing serves its model, so there is no traffic for its %s",
                    model_uri, registry.preview)
    return url


def _preview_on_ray_head(model_uri: str, settings: KeelSettings,
                         beside_champion: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
                         app: str) -> str | None:
    from keel.tracking import registered_name

    served = _served_here(registered_name(model_uri) or "", settings)
    if served is None:
        return None
    dashboard, details, configs = served
    before = copy.deepcopy(configs)
    configs = beside_champion(configs)
    _replace_applications(dashboard, details, configs)
    champion = next(c for c in configs if c.get("name") == APP_NAME)
    try:
        wait_until_running(dashboard, args=champion["args"])  # its replicas restart to copy or route requests
        wait_until_running(dashboard, model_uri=model_uri, app=app)
    except ServeError as failed:  # a canary that never started would have its share of requests fall back
        _serve_again(dashboard, details, before, failed)
        raise
    return _serving_url(details)


def _served_here(model_name: str, settings: KeelSettings) -> tuple[str, dict[str, Any], list[dict[str, Any]]] | None:
    """Where the Ray head (KEEL_RAY_DASHBOARD_URL's, or this machine's) serves ``model_name``: its dashboard,
    Serve's status and each application's deployed config; None when it serves another model, or nothing."""
    from keel.tracking import registered_name

    dashboard = dashboard_url(settings)
    details = _serving_status(dashboard, settings)  # {} with no local head: nothing is served here
    applications = details.get("applications", {})
    if registered_name(served_model_uri(applications.get(APP_NAME, {}))) != model_name:
        return None
    return dashboard, details, [application.get("deployed_app_config") or {} for application in applications.values()]


def dashboard_url(settings: KeelSettings) -> str:
    """The Ray dashboard Serve's REST API is reached at: KEEL_RAY_DASHBOARD_URL, else this machine's head."""
    return settings.serve_dashboard_url or f"http://127.0.0.1:{HeadPorts().dashboard}"


def no_local_head(settings: KeelSettings) -> bool:
    """Nothing to ask on this machine: no Ray head named, and nothing listens on the port of the one
    ``keel serve --detach`` starts."""
    return not settings.serve_dashboard_url and not port_in_use("127.0.0.1", HeadPorts().dashboard)


def _serving_status(dashboard: str, settings: KeelSettings) -> dict[str, Any]:
    """Serve's applications on ``dashboard``; none when no local head answers (a head the user named must)."""
    try:
        return status_rest(dashboard)
    except ServeError:
        if settings.serve_dashboard_url:
            raise
        return {}


def _replace_applications(dashboard: str, details: dict[str, Any], configs: list[dict[str, Any]]) -> None:
    """PUT ``configs`` as the Serve instance's applications, its HTTP options as Serve reported them."""
    _call("PUT", dashboard.rstrip("/") + APPLICATIONS,
          {"http_options": details.get("http_options") or {}, "applications": configs})


def _serving_url(details: dict[str, Any]) -> str:
    http = details.get("http_options") or {}
    return f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"


def roll_if_serving(model_name: str, model_uri: str, settings: KeelSettings) -> str | None:
    """Serve ``model_uri`` wherever ``model_name`` is being served now: the chart's RayService on a cluster,
    else the Ray head at KEEL_RAY_DASHBOARD_URL or the one ``keel serve --detach`` started here. Only the
    model changes; every other Serve setting (port, replicas, token) is kept, and other applications stay.
    A shadow or canary serving ``model_uri``'s version has graduated and is removed; any other one stays.
    Returns the serving URL, or None when nothing serves ``model_name`` (nothing is started then)."""
    from keel.tracking import same_registered_version

    if settings.ray_service:
        from keel.cluster import roll_if_serving as roll_rayservice

        return roll_rayservice(settings, model_uri, model_name)
    served = _served_here(model_name, settings)
    if served is None:
        return None
    dashboard, details, configs = served
    before = copy.deepcopy(configs)
    champion = next(c for c in configs if c.get("name") == APP_NAME)
    if champion["args"]["model_uri"] != model_uri:
        champion["args"]["model_uri"] = model_uri
        kept = without_challengers_serving(configs, APP_NAME, model_uri, partial(same_registered_version,
                                                                                 settings=settings))
        _replace_applications(dashboard, details, kept)
        try:
            wait_until_running(dashboard, model_uri=model_uri)
        except ServeError as failed:
            _serve_again(dashboard, details, before, failed)
            raise
    return _serving_url(details)


def _serve_again(dashboard: str, details: dict[str, Any], configs: list[dict[str, Any]], failed: ServeError) -> None:
    """Put back the applications a roll replaced when its model failed to start. Serve keeps the old replicas
    answering meanwhile, but its target stays the failed config, which every restart of the head or a replica
    would try again."""
    _replace_applications(dashboard, details, configs)
    champion = next(c for c in configs if c.get("name") == APP_NAME)
    try:
        wait_until_running(dashboard, args=champion["args"])
    except ServeError as again:
        raise ServeError(f"{failed} Serving {champion['args']['model_uri']} again failed too: {again}") from failed


def withdraw_challengers(model_name: str, model_uri: str, settings: KeelSettings) -> str | None:
    """Stop the shadow or canary serving ``model_uri``'s version beside ``model_name``'s champion (a version a
    person rejected): in the chart's RayService on a cluster, else on the Ray head ``keel serve --detach``
    started or KEEL_RAY_DASHBOARD_URL names. The champion keeps serving. Returns the serving URL when a
    challenger was withdrawn, None when none served that version."""
    from keel.tracking import same_registered_version

    if settings.ray_service:
        from keel.cluster import withdraw_challengers as withdraw_from_rayservice

        return withdraw_from_rayservice(settings, model_uri, model_name)
    served = _served_here(model_name, settings)
    if served is None:
        return None
    dashboard, details, configs = served
    kept = without_challengers_serving(configs, APP_NAME, model_uri,
                                       partial(same_registered_version, settings=settings))
    if len(kept) == len(configs):
        return None
    _replace_applications(dashboard, details, kept)
    champion = next(c for c in kept if c.get("name") == APP_NAME)
    wait_until_running(dashboard, args=champion["args"])  # its replicas restart without the challenger
    return _serving_url(details)
