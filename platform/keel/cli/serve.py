"""``keel serve``: deploy a registered model on Ray Serve; ``status`` and ``stop`` manage it."""

from __future__ import annotations

import json
import shlex
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any

import typer

from keel.cli.output import OUTPUT_OPTION, OutputFormat, print_json
from keel.settings import LOCAL_RAY_SYSTEM_CONFIG, load_settings

if TYPE_CHECKING:
    from keel.data.transform import FeatureTransform
    from keel.serve.config import CanaryConfig, ServeConfig, ShadowConfig

DEFAULT_MODEL = "models:/medical-diagnosis@champion"
ACTIONS = ("status", "stop")


def sample_request(model_uri: str) -> tuple[str, str]:
    """A ready-to-send request for ``model_uri``: its route and a JSON body with a typical row (training medians
    and most frequent categories), a customer message, or a recommender's first two users."""
    from keel.serve.deployment import load_registered

    loaded = load_registered(model_uri, load_settings())
    if loaded.intents is not None:  # a text classifier: one customer message
        texts = ["Hi, where is my order ORD-1234567? My email is jane@example.com"]
        return f"/v1/models/{loaded.name}:classify", json.dumps({"texts": texts})
    predictor = loaded.predictor
    if predictor is None:  # a recommender: top 10 for its first two users, in the user's own ids
        users = loaded.recommender.user_ids[:2].tolist() if loaded.recommender is not None else []
        return f"/v1/models/{loaded.name}:recommend", json.dumps({"user_ids": users, "k": 10})
    row = typical_row(predictor.transform)
    return f"/v1/models/{loaded.name}:predict", json.dumps({"records": [row]}, ensure_ascii=False)


def typical_row(transform: FeatureTransform) -> dict[str, object]:
    """Medians and most frequent categories: values a real row has (a class of 2, not a mean of 2.0581), and a
    column the contract types bool as true or false."""
    row: dict[str, object] = {}
    for name, stats in transform.numeric.items():
        if transform.boolean is not None and name in transform.boolean:
            row[name] = stats.median >= 0.5
        else:
            row[name] = int(stats.median) if stats.median.is_integer() else round(stats.median, 4)
    row.update({name: stats.mode for name, stats in transform.categorical.items()})
    return row


def serve_command(
    target: str = typer.Argument(DEFAULT_MODEL, help="A registry URI (models:/NAME@ALIAS or models:/NAME/N), "
                                                     "or `status` / `stop`."),
    port: int = typer.Option(8000, "--port", help="HTTP port of the Serve ingress."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address the ingress binds (0.0.0.0 in a cluster)."),
    replicas: int = typer.Option(1, "--replicas", help="Fixed number of replicas."),
    min_replicas: int | None = typer.Option(None, "--min-replicas", help="Autoscaling lower bound."),
    max_replicas: int | None = typer.Option(None, "--max-replicas", help="Autoscaling upper bound."),
    detach: bool = typer.Option(False, "--detach", help="Start a local Ray head and return; `keel serve stop` ends it."),
    haproxy: bool = typer.Option(True, "--haproxy/--python-proxy", help="Ray Serve's HAProxy ingress (faster)."),
    require_token: bool = typer.Option(False, "--require-token",
                                       help="Answer 401 unless requests send 'Authorization: Bearer $KEEL_SERVE_TOKEN'."),
    shadow: str | None = typer.Option(None, "--shadow", help="A challenger (registry URI) that scores a copy of "
                                      "the rows; its answers are compared, never returned."),
    shadow_sample: float = typer.Option(1.0, "--shadow-sample",
                                        help="Share of forward passes (batches of rows) copied to the shadow."),
    canary: str | None = typer.Option(None, "--canary", help="A challenger (registry URI) that answers a share "
                                      "of the requests (--canary-weight); the champion answers the rest."),
    canary_weight: float = typer.Option(0.1, "--canary-weight", help="Share of scoring requests the canary "
                                        "answers, between 0 and 1; callers sending the same x-routing-key "
                                        "header meet the same version."),
    output: OutputFormat = OUTPUT_OPTION,
) -> None:
    """Serve a registered model with Ray Serve (local Ray, or the cluster at KEEL_RAY_DASHBOARD_URL)."""
    from keel.serve import control
    from keel.serve.config import ServeConfig
    from keel.tracking import resolve_version

    settings = load_settings()
    dashboard = control.dashboard_url(settings)
    # the chart's RayService serves there, and KubeRay owns its Serve config (unless another head is named)
    served_by_rayservice = bool(settings.ray_service and not settings.ray_dashboard_url)
    if target in ACTIONS and control.no_local_head(settings):  # as `kubectl get` with nothing there: no error
        if target == "stop":
            control.stop_local_head(settings)  # the record of a head that died
        if output is OutputFormat.json and target == "status":
            print_json({"applications": {}})
        else:
            typer.echo("No model is being served here (no Ray head of `keel serve --detach` runs).")
        return
    if target == "status":
        print_json(control.status_rest(dashboard)) if output is OutputFormat.json else _print_status(dashboard)
        return
    if target == "stop":
        if served_by_rayservice:
            raise control.ServeError(
                f"RayService {settings.ray_service} (KEEL_RAY_SERVICE) serves this cluster's models: `keel serve "
                "stop` would delete its Serve applications behind KubeRay's back. The chart owns it: `helm "
                "upgrade --set ray.serving.enabled=false` stops serving.")
        control.stop_rest(dashboard)
        if not settings.serve_dashboard_url and control.stop_local_head(settings):
            typer.echo("Stopped the model server and the local Ray head it ran on.")
            return
        typer.echo("Stopped the model server.")
        return
    if served_by_rayservice:
        raise control.ServeError(
            f"RayService {settings.ray_service} (KEEL_RAY_SERVICE) serves this cluster's models: a Serve config "
            "`keel serve` sent its head would differ from the RayService's own, which KubeRay puts back whenever "
            "the head restarts. `keel models promote NAME VERSION --reason ...` rolls the RayService to a version; "
            "to serve on a Ray head of your own, set KEEL_RAY_DASHBOARD_URL to its dashboard.")
    resolve_version(target, settings)  # an unknown model fails here, by name, before anything starts
    shadow_config, canary_config = _challenger_configs(shadow, shadow_sample, canary, canary_weight)
    if shadow or canary:
        _check_challengers(target, shadow, canary)
    config = ServeConfig(port=port, host=host, replicas=replicas, min_replicas=min_replicas,
                         max_replicas=max_replicas, require_token=require_token, shadow=shadow_config,
                         canary=canary_config)
    if detach or settings.serve_dashboard_url:
        with ThreadPoolExecutor(max_workers=1) as pool:
            # The sample request loads the model in this process (3-4 s): meanwhile Ray starts and the
            # replicas load theirs, which the deploy only waits on.
            sample = pool.submit(sample_request, target) if output is OutputFormat.table else None
            url = control.deploy_detached(target, config, settings, haproxy=haproxy, shadow_uri=shadow,
                                          canary_uri=canary)
            _announce(url, target, output, shadow, canary, sample.result if sample else partial(sample_request, target))
        return
    _serve_in_foreground(target, config, haproxy, output, shadow, canary)


def _challenger_configs(shadow: str | None, shadow_sample: float, canary: str | None,
                        canary_weight: float) -> tuple[ShadowConfig | None, CanaryConfig | None]:
    """The champion's settings for its shadow and canary; a ConfigError naming the option that is out of range."""
    from pydantic import ValidationError

    from keel.errors import ConfigError
    from keel.serve.config import CanaryConfig, ShadowConfig

    try:
        return (ShadowConfig(sample=shadow_sample) if shadow else None,
                CanaryConfig(weight=canary_weight) if canary else None)
    except ValidationError as e:
        option = "--canary-weight" if e.title == CanaryConfig.__name__ else "--shadow-sample"
        raise ConfigError(f"{option}: {e.errors()[0]['msg']}") from e


def _check_challengers(model_uri: str, shadow_uri: str | None, canary_uri: str | None) -> None:
    """Fail before deploying a shadow whose copies could never be compared with the champion's answers, or a
    canary that would refuse the champion's requests."""
    from keel.serve.canary import check_canary_fits
    from keel.serve.deployment import load_registered
    from keel.serve.shadow import check_shadow_fits

    champion = load_registered(model_uri, load_settings())
    if shadow_uri:
        challenger = load_registered(shadow_uri, load_settings())
        check_shadow_fits(champion.kind, champion.compared_columns, challenger.kind, challenger.compared_columns,
                          model_uri, shadow_uri)
    if canary_uri:
        canary = load_registered(canary_uri, load_settings())
        check_canary_fits(champion.kind, champion.compared_columns, canary.kind, canary.compared_columns,
                          model_uri, canary_uri)


def _announce(url: str, model_uri: str, output: OutputFormat, shadow_uri: str | None,
              canary_uri: str | None, sample: Callable[[], tuple[str, str]]) -> None:
    if output is OutputFormat.json:
        print_json({"url": url, "model_uri": model_uri, "metrics": f"{url}/metrics", "openapi": f"{url}/docs",
                    "shadow_model_uri": shadow_uri, "canary_model_uri": canary_uri})
        return
    typer.echo(f"Serving {model_uri} at {url}  (OpenAPI: {url}/docs, metrics: {url}/metrics)")
    if shadow_uri:
        typer.echo(f"Shadow: {shadow_uri} scores a copy of the rows; agreement is keel_shadow_rows_total "
                   "in the metrics")
    if canary_uri:
        typer.echo(f"Canary: {canary_uri} answers a share of the requests (x-model-version says which); "
                   "keel_canary_requests_total counts them by outcome")
    route, body = sample()
    typer.echo(f"Try it:\n  curl -s -X POST {url}{route} -H 'content-type: application/json' -d {shlex.quote(body)}")


def _print_status(dashboard: str) -> None:
    from keel.serve import control
    from keel.serve.challenger import CANARY_APP, SHADOW_APP
    from keel.serve.config import APP_NAME

    applications = control.status_rest(dashboard).get("applications", {})
    if not applications:
        typer.echo("No model is being served.")
    champion = (applications.get(APP_NAME, {}).get("deployed_app_config") or {}).get("args", {}).get("config") or {}
    weight = (champion.get("canary") or {}).get("weight")
    for name, application in applications.items():
        model = control.served_model_uri(application) or "?"
        role = {SHADOW_APP: "  (shadow: scores copies of the requests, answers nobody)",
                CANARY_APP: f"  (canary: answers {f'{weight:.0%} of ' if weight else 'some of '}the requests)"
                }.get(name, "")
        typer.echo(f"{name}: {application.get('status')}  {model}{role}")
        for deployment, state in application.get("deployments", {}).items():
            typer.echo(f"  {deployment}: {state.get('status')}, {replicas_line(state)}")


def replicas_line(deployment: dict[str, Any]) -> str:
    """A deployment's replicas by state, from Serve's REST status (a list of replicas, each with its state).

    ``recent_dead_replicas`` holds every replica stopped lately, kept for its logs: a roll to a new version or
    a scale-down stops them as surely as a crash does, so they are counted as stopped, not as deaths."""
    states = Counter(str(replica.get("state")) for replica in deployment.get("replicas", []))
    counted = ", ".join(f"{count} {state}" for state, count in sorted(states.items())) or "none yet"
    stopped = len(deployment.get("recent_dead_replicas", []))
    return (f"replicas: {counted} (target {deployment.get('target_num_replicas', '?')})"
            + (f"; {stopped} stopped recently (a roll, a scale-down or a crash; Ray's dashboard has their logs)"
               if stopped else ""))


def _serve_in_foreground(model_uri: str, config: ServeConfig, haproxy: bool, output: OutputFormat,
                         shadow_uri: str | None, canary_uri: str | None) -> None:
    import logging
    import os
    import signal

    import ray
    from ray import serve

    from keel.serve.config import local_haproxy_environment
    from keel.serve.control import ServeError, port_in_use
    from keel.serve.deployment import deploy

    host, port = config.host, config.port
    if port_in_use(host, port):  # this process starts a Ray of its own: the port must be free
        raise ServeError(f"port {port} on {host} is taken, so Serve cannot listen there: stop what listens there "
                         "(a detached Keel server? `keel serve stop`), or serve on another port (--port).")
    if haproxy:
        os.environ.update(local_haproxy_environment())
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             _system_config=LOCAL_RAY_SYSTEM_CONFIG)
    try:
        url = deploy(model_uri, config, shadow_uri, canary_uri=canary_uri)
        _announce(url, model_uri, output, shadow_uri, canary_uri, partial(sample_request, model_uri))
        typer.echo("Press Ctrl-C to stop.")
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        serve.shutdown()
        ray.shutdown()
