"""``keel serve``: deploy a registered model on Ray Serve; ``status`` and ``stop`` manage it."""

from __future__ import annotations

import json

import typer

from keel.cli.output import OUTPUT_OPTION, OutputFormat, print_json
from keel.settings import load_settings

DEFAULT_MODEL = "models:/medical-diagnosis@champion"
ACTIONS = ("status", "stop")


def sample_request(url: str, model_uri: str) -> str:
    """A ready-to-paste curl call with a typical row: training means and most frequent categories."""
    from keel.serve.deployment import load_registered

    loaded = load_registered(model_uri, load_settings())
    if loaded.intents is not None:  # a text classifier: one customer message
        body = json.dumps({"texts": ["Hi, where is my order ORD-1234567? My email is jane@example.com"]})
        return (f"curl -s -X POST {url}/v1/models/{loaded.name}:classify -H 'content-type: application/json' "
                f"-d '{body}'")
    predictor = loaded.predictor
    if predictor is None:  # a recommender: top 10 for its first two users, in the user's own ids
        users = loaded.recommender.user_ids[:2].tolist() if loaded.recommender is not None else []
        body = json.dumps({"user_ids": users, "k": 10})
        return (f"curl -s -X POST {url}/v1/models/{loaded.name}:recommend -H 'content-type: application/json' "
                f"-d '{body}'")
    row: dict[str, object] = {c: round(s.mean, 4) for c, s in predictor.transform.numeric.items()}
    row.update({c: s.mode for c, s in predictor.transform.categorical.items()})
    body = json.dumps({"records": [row]})
    return f"curl -s -X POST {url}/v1/models/{loaded.name}:predict -H 'content-type: application/json' -d '{body}'"


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
    output: OutputFormat = OUTPUT_OPTION,
) -> None:
    """Serve a registered model with Ray Serve (local Ray, or the cluster at KEEL_RAY_DASHBOARD_URL)."""
    from keel.serve import control
    from keel.serve.deployment import ServeConfig, resolve_version
    from keel.serve.shadow import ShadowConfig

    settings = load_settings()
    dashboard = control.dashboard_url(settings)
    if target == "status":
        print_json(control.status_rest(dashboard)) if output is OutputFormat.json else _print_status(dashboard)
        return
    if target == "stop":
        control.stop_rest(dashboard)
        if not settings.serve_dashboard_url and control.stop_local_head(settings):
            typer.echo("Stopped the model server and the local Ray head it ran on.")
            return
        typer.echo("Stopped the model server.")
        return
    resolve_version(target, settings)  # an unknown model fails here, by name, before anything starts
    if shadow:
        _check_shadow(target, shadow)
    config = ServeConfig(port=port, host=host, replicas=replicas, min_replicas=min_replicas,
                         max_replicas=max_replicas, require_token=require_token,
                         shadow=ShadowConfig(sample=shadow_sample) if shadow else None)
    if detach or settings.serve_dashboard_url:
        url = control.deploy_detached(target, config, settings, haproxy=haproxy, shadow_uri=shadow)
        _announce(url, target, output, shadow)
        return
    _serve_in_foreground(target, config, haproxy, output, shadow)


def _check_shadow(model_uri: str, shadow_uri: str) -> None:
    """Fail before deploying a shadow whose copies could never be compared with the champion's answers."""
    from keel.serve.deployment import load_registered
    from keel.serve.shadow import check_shadow_fits

    champion, challenger = (load_registered(uri, load_settings()) for uri in (model_uri, shadow_uri))
    check_shadow_fits(champion.compared_columns, challenger.compared_columns, model_uri, shadow_uri)


def _announce(url: str, model_uri: str, output: OutputFormat, shadow_uri: str | None = None) -> None:
    if output is OutputFormat.json:
        print_json({"url": url, "model_uri": model_uri, "metrics": f"{url}/metrics", "openapi": f"{url}/docs",
                    "shadow_model_uri": shadow_uri})
        return
    typer.echo(f"Serving {model_uri} at {url}  (OpenAPI: {url}/docs, metrics: {url}/metrics)")
    if shadow_uri:
        typer.echo(f"Shadow: {shadow_uri} scores a copy of the rows; agreement is keel_shadow_rows_total "
                   "in the metrics")
    typer.echo(f"Try it:\n  {sample_request(url, model_uri)}")


def _print_status(dashboard: str) -> None:
    from keel.serve import control
    from keel.serve.shadow import SHADOW_APP

    applications = control.status_rest(dashboard).get("applications", {})
    if not applications:
        typer.echo("No model is being served.")
    for name, application in applications.items():
        model = control.served_model_uri(application) or "?"
        role = "  (shadow: scores copies of the requests, answers nobody)" if name == SHADOW_APP else ""
        typer.echo(f"{name}: {application.get('status')}  {model}{role}")
        for deployment, state in application.get("deployments", {}).items():
            typer.echo(f"  {deployment}: {state.get('status')} {state.get('replica_states', {})}")


def _serve_in_foreground(model_uri: str, config: object, haproxy: bool, output: OutputFormat,
                         shadow_uri: str | None) -> None:
    import logging
    import os
    import signal

    import ray
    from ray import serve

    from keel.serve.deployment import HAPROXY_ENVIRONMENT, deploy

    if haproxy:
        os.environ.update(HAPROXY_ENVIRONMENT)
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        url = deploy(model_uri, config, shadow_uri)  # type: ignore[arg-type]
        _announce(url, model_uri, output, shadow_uri)
        typer.echo("Press Ctrl-C to stop.")
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        serve.shutdown()
        ray.shutdown()
