"""``keel run PIPELINE``: run a pipeline end to end on this machine and summarize it."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import typer

from keel.cli.output import OUTPUT_OPTION, OutputFormat, print_json, print_table
from keel.errors import ConfigError, KeelError
from keel.serve.config import PORTS
from keel.settings import KeelSettings, load_settings

RANKING_METRICS = ("recall_at_", "ndcg_at_", "ndcg_lift")
# What KFP's types cannot say about the pipelines' parameters, checked before anything runs: a serve_port of
# 99999 trained, registered and then failed the deploy step, minutes in.
PARAMETER_RANGES = {"serve_port": PORTS, "gpus": (0, None)}


def _typed(name: str, value: str, kind: str) -> Any:
    """A parameter's text as the type the pipeline declares (KFP's Boolean, Integer, Double, String)."""
    try:
        if kind == "Boolean":
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if kind == "Integer":
            return int(value)
        if kind in ("Double", "Float"):
            return float(value)
    except ValueError as e:
        expected = {"Boolean": "true or false", "Integer": "an integer"}.get(kind, "a number")
        raise ConfigError(f"--param {name}={value}: expected {expected}.") from e
    return value


def parse_params(pairs: list[str], accepted: dict[str, str]) -> dict[str, Any]:
    """``NAME=VALUE`` pairs into typed pipeline arguments, rejecting names the pipeline lacks."""
    arguments = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ConfigError(f"--param {pair!r}: expected NAME=VALUE, e.g. --param source=data.csv.")
        if name not in accepted:
            raise ConfigError(f"--param {name}: the pipeline has no such parameter; it takes {sorted(accepted)}. "
                              "Stage settings go in a --config file.")
        arguments[name] = _in_range(name, _typed(name, value, accepted[name]))
    return arguments


def _in_range(name: str, value: Any) -> Any:
    low, high = PARAMETER_RANGES.get(name, (None, None))
    if (low is not None and value < low) or (high is not None and value > high):
        expected = f"{low} to {high}" if high is not None else f"{low} or more"
        raise ConfigError(f"--param {name}={value}: expected {expected}.")
    return value


def require_parameters(built: Any, arguments: dict[str, Any], pipeline: str) -> None:
    """A parameter with no default (the labeled table a check reads, say) named before anything runs."""
    missing = sorted(name for name, spec in built.component_spec.inputs.items()
                     if not spec.optional and name not in arguments)
    if missing:
        raise ConfigError(f"{pipeline} needs " + " ".join(f"--param {name}=..." for name in missing)
                          + f" (it has no default); see pipelines/{pipeline}/README.md.")


def pipeline_parameters(built: Any, excluded: tuple[str, ...]) -> dict[str, str]:
    """The pipeline's parameters a user may set with --param, with their KFP types."""
    return {name: str(spec.type) for name, spec in built.component_spec.inputs.items() if name not in excluded}


def stage_rows(manifests: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """One summary line per stage: its own compute seconds and what it produced."""
    from keel.gate import gate_verdict
    from keel.runs import registered_as  # keel.registry would load torch and MLflow for one word
    from keel.tune import describe_values

    facts = {
        "check": lambda m: f"{m['verdict']} on {m['rows']} labeled rows",
        "ingest": lambda m: f"{m['rows']} rows from {m['source']}",
        "validate": lambda m: "contract passed",
        "preprocess": lambda m: "train/val/test " + "/".join(str(m["rows"][s]) for s in ("train", "val", "test")),
        "tune": lambda m: (f"{m['trials']} trials, {m['epochs']} epochs, best {describe_values(m['best_config'])}"
                           if m["trials"] else "skipped (tune.num_samples is 0)"),
        "compress": lambda m: f"registering {m['chosen']}",
        "train": lambda m: (f"{m['epochs']} epochs{' (early stop)' if m['stopped_early'] else ''}, "
                            f"{m['scaling']['num_workers']} worker(s), Ray start {m['ray_startup_s']:.1f} s"),
        # the verdict alone: the checks follow the table, a line each (print_summary)
        "evaluate": lambda m: (f"accuracy {m['accuracy']:.4f} on {m['rows']} test rows; "
                               f"{gate_verdict(m['gate_passed'])}"),
        "register": lambda m: f"version {m['version']}{registered_as(m)}",
        "predict": lambda m: f"{m['rows']} rows scored by {m['model_uri']}",
    }
    # A stage may state its own line (the recommendation stages do); else the line comes from its manifest.
    return [[stage, f"{m['duration_s']:.2f}", m.get("summary") or facts[stage](m)]
            for stage, m in manifests.items() if stage in facts]


def summary(run: Any, settings: KeelSettings) -> dict[str, Any]:
    from keel import tracking
    from keel.evaluate import HEADLINE_METRICS
    from keel.runs import stage_manifests

    manifests = stage_manifests(settings, run.run_id) if run.succeeded else _readable_manifests(settings, run.run_id)
    evaluation = manifests.get("evaluate", {})
    registered = manifests.get("register", {})
    return {
        "run_id": run.run_id, "succeeded": run.succeeded, "interrupted": run.interrupted,
        "wall_s": round(run.wall_s, 2),
        "error": run.error, "log": str(run.log_path),
        "stages": [{"stage": stage, "duration_s": m["duration_s"]} for stage, m in manifests.items()],
        "test_metrics": {k: v for k, v in evaluation.items() if k in HEADLINE_METRICS or k.startswith(RANKING_METRICS)},
        "model_uri": registered.get("model_uri"), "champion": registered.get("promoted"),
        "awaiting_approval": bool(registered.get("awaiting_approval")),
        "previous_champion": registered.get("previous_champion"),
        "model_name": registered.get("model_name"), "promotion": registered.get("reason"),
        "promotion_checks": registered.get("checks", []),
        "predictions": manifests.get("predict", {}).get("predictions"),
        "tracking_uri": settings.mlflow_tracking_uri,
        "mlflow_run_url": tracking.mlflow_run_url(settings.mlflow_tracking_uri,
                                                  registered.get("mlflow_experiment_id"), registered.get("mlflow_run_id")),
        "artifacts": f"{settings.artifact_root}/runs/{run.run_id}",
        "_rows": stage_rows(manifests),
    }


def mlflow_ui_command(tracking_uri: str) -> str | None:
    """The command that opens MLflow's UI on a local store; None for a tracking server, which has its own UI.

    Spelled with this interpreter's ``mlflow`` script, so it runs without activating the virtualenv.
    """
    from keel.tracking import is_tracking_server

    if is_tracking_server(tracking_uri) or tracking_uri.startswith("databricks"):
        return None
    script = Path(sys.executable).parent / "mlflow"
    return shlex.join([str(script) if script.exists() else "mlflow", "ui", "--backend-store-uri", tracking_uri])


def refuse_a_taken_run_name(run_name: str, settings: KeelSettings) -> None:
    """A run finds its MLflow run and its outputs by name (so a retried step rejoins its own run): a second
    run under a taken name would log into the first one's MLflow run and replace its outputs, which its
    registered version's lineage points at."""
    from keel import storage

    earlier = storage.run_uri(settings, run_name)
    if storage.holds_anything(earlier, settings):
        raise ConfigError(f"--run-name {run_name}: an earlier run has that name (its outputs are at {earlier}); "
                          "choose another, or leave --run-name out for a fresh one.")


def _readable_manifests(settings: KeelSettings, run_id: str) -> dict[str, dict[str, Any]]:
    """A failed run's manifests, or none when its artifact store cannot be read: the store a step could not
    reach is likely unreachable here too, and the step's own error, reported below the table, says why."""
    from keel.runs import stage_manifests

    try:
        return stage_manifests(settings, run_id)
    except KeelError:
        return {}


def print_summary(report: dict[str, Any]) -> None:
    from keel import tracking
    from keel.runs import promotion_lines

    state = "succeeded" if report["succeeded"] else "INTERRUPTED" if report.get("interrupted") else "FAILED"
    typer.echo(f"\nRun {report['run_id']} {state} in {report['wall_s']:.1f} s\n")
    if report["_rows"]:  # none when the first step failed: its error follows the summary
        print_table(["stage", "seconds", "result"], report["_rows"])
    if report["test_metrics"]:
        typer.echo("\nTest metrics: " + "  ".join(f"{k} {v:.4f}" for k, v in report["test_metrics"].items()))
    if report["model_uri"]:
        alias = ("champion" if report["champion"]
                 else "challenger, awaiting approval" if report.get("awaiting_approval")
                 else "challenger; the champion stays" if report.get("previous_champion")
                 else "challenger; no champion yet")
        typer.echo(f"Registered model: {report['model_uri']} ({alias})")
        head, *checks = promotion_lines(report["promotion"], report.get("promotion_checks", []))
        typer.echo("\n  ".join([f"Promotion: {head}", *checks]))
        typer.echo(f"MLflow tracking URI: {report['tracking_uri']}")
        browse = mlflow_ui_command(report["tracking_uri"])
        if browse:
            typer.echo(f"Browse it: {browse}  (then {tracking.LOCAL_MLFLOW_UI})")
        if report.get("mlflow_run_url"):
            typer.echo(f"MLflow run: {report['mlflow_run_url']}")
        # a challenger is loaded by its version: the champion alias may name another model, or none yet
        loadable = f"models:/{report['model_name']}@champion" if report["champion"] else report["model_uri"]
        typer.echo(f"Load it: mlflow.pyfunc.load_model(\"{loadable}\")")
    if report.get("predictions"):
        typer.echo(f"Predictions: {report['predictions']}")
    typer.echo(f"Artifacts: {report['artifacts']}\nLog: {report['log']}")


def _mark_mlflow_run_ended(settings: KeelSettings, run_id: str, status: str = "FAILED") -> None:
    """A failed pipeline leaves its MLflow run FAILED (KILLED when interrupted), not RUNNING forever; best effort,
    since the reason the run failed (MLflow gone, say) must still be reported."""
    from mlflow.exceptions import MlflowException

    from keel import tracking

    try:
        client = tracking.mlflow_client(settings)
        for found in tracking.runs_of_pipeline_run(client, run_id):
            if found.info.status == "RUNNING":
                client.set_terminated(found.info.run_id, status)
    except (KeelError, MlflowException, OSError) as e:
        typer.echo(f"keel: warning: could not mark the MLflow run of {run_id} {status}: {e}", err=True)


def run_pipeline(
    pipeline: str = typer.Argument(..., help="Pipeline name, e.g. medical_diagnosis."),
    param: list[str] = typer.Option([], "--param", "-p", help="Pipeline parameter NAME=VALUE; repeatable."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML merged over the pipeline's config."),
    run_name: str = typer.Option("", "--run-name", help="Name for this run's artifacts and MLflow run."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show every step's output, not only the log file."),
    output: OutputFormat = OUTPUT_OPTION,
) -> None:
    """Run PIPELINE end to end on this machine (kfp.local, local Ray, MLflow on SQLite by default)."""
    import pipelines
    from keel.local import new_run_id, run_local
    from keel.storage import check_s3_endpoint
    from keel.tracking import check_tracking_server
    from keel.train.scaling import check_gpus_before_run

    settings = load_settings()
    # kfp.local honours retry policies: locally a failed step is reported at once (the cluster YAML keeps them)
    built = pipelines.build(pipeline, config, retries=0)
    arguments = parse_params(param, pipeline_parameters(built, ("config", "run_name")))
    require_parameters(built, arguments, pipeline)
    check_gpus_before_run(int(arguments.get("gpus", 0)), settings)  # not 18 s into tune
    check_tracking_server(settings.mlflow_tracking_uri)  # not minutes into the first step that logs
    check_s3_endpoint(settings)  # nor as a step's failure and urllib3's retry warnings
    if run_name:
        refuse_a_taken_run_name(run_name, settings)
    run = run_local(built, arguments, run_name or new_run_id(pipeline), settings, stream=verbose)
    if not run.succeeded:
        _mark_mlflow_run_ended(settings, run.run_id, "KILLED" if run.interrupted else "FAILED")
    report = summary(run, settings)
    if output is OutputFormat.json:
        print_json({k: v for k, v in report.items() if not k.startswith("_")})
    else:
        print_summary(report)
    if run.interrupted:
        assert run.error is not None
        how = run.error["error"].split(" ", 1)[0]
        typer.echo(f"keel: {how} during {run.error['stage']} after {run.wall_s:.0f} s: the steps before it "
                   "kept their outputs (Artifacts, above) and the run's MLflow run is marked KILLED.", err=True)
        sys.exit(run.exit_code)  # 128 + the signal, as a shell reports a command a signal ended
    if not run.succeeded:
        assert run.error is not None
        typer.echo(f"keel: error: {run.error['stage']} failed: {run.error['error']}", err=True)
        sys.exit(1)
