"""``keel submit``, ``keel schedule`` and ``keel status``: Keel on a Kubernetes cluster."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import typer

from keel.cli.output import OUTPUT_OPTION, OutputFormat, print_json, print_table
from keel.errors import ConfigError
from keel.settings import load_settings
from keel.submit import DEFAULT_SERVICE_ACCOUNT

HOST_OPTION = typer.Option("", "--host", help="Kubeflow Pipelines API endpoint; default KEEL_KFP_HOST.")
EXPERIMENT_OPTION = typer.Option("keel", "--experiment", help="KFP experiment to run in.")
NAMESPACE_OPTION = typer.Option("", "--namespace", "-n", help="Profile namespace on a multi-user Kubeflow, where the "
                                                             "experiment and the steps' pods are; default "
                                                             "KEEL_KFP_NAMESPACE.")
PARAM_OPTION = typer.Option([], "--param", "-p", help="Pipeline parameter NAME=VALUE; repeatable.")
CONFIG_OPTION = typer.Option(None, "--config", "-c", help="YAML merged over the pipeline's config.")
IMAGE_OPTION = typer.Option("", "--image", help="Image the steps run, from `make image IMAGE=...` "
                                                 "(REGISTRY/PATH:TAG); default KEEL_IMAGE, else Keel's own.")
ACCOUNT_OPTION = typer.Option(DEFAULT_SERVICE_ACCOUNT, "--service-account",
                              help="ServiceAccount the steps run as (the chart creates it).")


# `keel submit --wait`: the run finished and did not succeed (1 is every error's, so CI tells them apart)
RUN_FAILED_EXIT_CODE = 3


def _kfp_client(host: str, namespace: str) -> Any:
    from keel import submit

    settings = load_settings()
    host = host or settings.kfp_host
    if not host:
        raise ConfigError("no Kubeflow Pipelines host: pass --host or set KEEL_KFP_HOST.")
    return submit.client_for(host, settings.kfp_token.get_secret_value(), namespace or settings.kfp_namespace)


def _submit(pipeline: str, host: str, namespace: str, experiment: str, param: list[str], config: Path | None,
            cron: str, service_account: str, image: str, output: OutputFormat, wait_s: float | None = None,
            schedule_name: str = "") -> None:
    import pipelines
    from keel import submit, tracking
    from keel.cli.run import parse_params, pipeline_parameters, require_parameters
    from keel.images import chosen_image

    settings = load_settings()
    host = host or settings.kfp_host
    image = chosen_image(image, settings.image)
    built = pipelines.build(pipeline, config)
    params = parse_params(param, pipeline_parameters(built, ("config",)))
    require_parameters(built, params, pipeline)  # a recurring run would fail on the server, every time
    submit.refuse_sources_on_this_machine(params)
    client = _kfp_client(host, namespace)
    result = submit.submit(client, pipeline, host, experiment, params, tracking.git_commit(settings),
                           config=config, cron=cron, service_account=service_account, schedule_name=schedule_name,
                           image=image)
    what = f"Recurring run ({cron})" if cron else "Run"
    started = f"{what} {result.run_id} of {pipeline} version {result.version_name} started: {result.url}"
    if result.replaced:
        started += f"; it replaces {', '.join(result.replaced)} of the same name"
    if wait_s is None and output is OutputFormat.json:
        print_json(asdict(result))
        return
    if wait_s is None:
        typer.echo(started)
        return
    typer.echo(started, err=True)  # stdout keeps the one answer a script parses
    try:
        outcome = submit.wait_for_run(client, result.run_id, wait_s)
    except (KeyboardInterrupt, SystemExit) as stopped:  # Ctrl-C, or SIGTERM from a cancelled CI job
        typer.echo(f"keel: stopped waiting; run {result.run_id} goes on on the cluster: {result.url}", err=True)
        raise SystemExit(130 if isinstance(stopped, KeyboardInterrupt) else stopped.code) from None
    if output is OutputFormat.json:
        print_json({**asdict(result), **asdict(outcome)})
    else:
        typer.echo(f"Run {result.run_id} of {pipeline} {outcome.state} in {outcome.seconds:.0f} s: {result.url}")
        for step, error in outcome.failed_steps.items():
            typer.echo(f"  {step} failed" + (f": {error}" if error else ""))
        if outcome.error and not outcome.failed_steps:
            typer.echo(f"  {outcome.error}")
    if not outcome.succeeded:
        raise typer.Exit(RUN_FAILED_EXIT_CODE)


def submit_command(
    pipeline: str = typer.Argument(..., help="Pipeline name, e.g. medical_diagnosis."),
    host: str = HOST_OPTION,
    namespace: str = NAMESPACE_OPTION,
    experiment: str = EXPERIMENT_OPTION,
    param: list[str] = PARAM_OPTION,
    config: Path | None = CONFIG_OPTION,
    service_account: str = ACCOUNT_OPTION,
    image: str = IMAGE_OPTION,
    wait: bool = typer.Option(False, "--wait", help="Wait for the run to finish, reporting each step as it ends; "
                                                     f"exit {RUN_FAILED_EXIT_CODE} unless it succeeded."),
    timeout: float = typer.Option(6 * 3600, "--timeout", min=1, help="Seconds --wait waits before giving up "
                                                                     "(the run goes on)."),
    output: OutputFormat = OUTPUT_OPTION,
) -> None:
    """Compile PIPELINE, upload it as version <keel version>-<commit>, and start a run on Kubeflow Pipelines."""
    _submit(pipeline, host, namespace, experiment, param, config, "", service_account, image, output,
            timeout if wait else None)


def schedule_command(
    pipeline: str = typer.Argument(..., help="Pipeline name, e.g. medical_diagnosis; or `list`."),
    cron: str = typer.Option("", "--cron", help="Crontab schedule, e.g. '0 3 * * *' (03:00 daily, UTC)."),
    name: str = typer.Option("", "--name", help="The recurring run's name in the experiment (default: the "
                                                "pipeline's, e.g. medical-diagnosis); scheduling a name again "
                                                "replaces its run."),
    delete: bool = typer.Option(False, "--delete", help="Delete the recurring run of that name instead."),
    pause: bool = typer.Option(False, "--pause", help="Pause it: it keeps its schedule and starts nothing."),
    resume: bool = typer.Option(False, "--resume", help="Resume a paused one."),
    host: str = HOST_OPTION,
    namespace: str = NAMESPACE_OPTION,
    experiment: str = EXPERIMENT_OPTION,
    param: list[str] = PARAM_OPTION,
    config: Path | None = CONFIG_OPTION,
    service_account: str = ACCOUNT_OPTION,
    image: str = IMAGE_OPTION,
    output: OutputFormat = OUTPUT_OPTION,
) -> None:
    """Schedule PIPELINE on Kubeflow Pipelines (one run at a time, no catch-up), replacing the recurring run of
    the same name; `keel schedule list` shows the experiment's; `--pause`, `--resume` and `--delete` act on one."""
    from keel import submit

    if pipeline == "list":
        rows = submit.list_schedules(_kfp_client(host, namespace), experiment)
        if output is OutputFormat.json:
            print_json(rows)
            return
        print_table(["NAME", "CRON", "STATUS", "ID", "DESCRIPTION"],
                    [[r["name"], r["cron"], r["status"], r["id"], r["description"]] for r in rows])
        return
    actions = [action for action, chosen in (("delete", delete), ("pause", pause), ("resume", resume)) if chosen]
    if len(actions) > 1:
        raise ConfigError(f"--{' and --'.join(actions)}: choose one.")
    if actions:
        import pipelines

        schedule_name = name or pipelines.build(pipeline).name
        changed = submit.change_schedules(_kfp_client(host, namespace), experiment, schedule_name, actions[0])
        if output is OutputFormat.json:
            print_json({"name": schedule_name, "action": actions[0], "recurring_runs": changed})
            return
        done = {"delete": "Deleted", "pause": "Paused", "resume": "Resumed"}[actions[0]]
        typer.echo(f"{done} recurring run {', '.join(changed)} ({schedule_name}) in experiment {experiment}.")
        return
    if not cron:
        raise ConfigError("keel schedule needs --cron '<crontab>' to schedule a pipeline (or --pause, --resume or "
                          "--delete for its recurring run; `keel schedule list` shows them).")
    submit.kfp_cron(cron)  # a bad expression fails before anything is compiled or uploaded
    _submit(pipeline, host, namespace, experiment, param, config, cron, service_account, image, output,
            schedule_name=name)


def status_command(output: OutputFormat = OUTPUT_OPTION) -> None:
    """Keel's RayClusters, RayService, MLflow, MinIO and PostgreSQL in KEEL_KUBE_NAMESPACE."""
    from keel.cluster import cluster_status

    rows = cluster_status(load_settings())
    if output is OutputFormat.json:
        print_json(rows)
        return
    print_table(["KIND", "NAME", "STATE", "DETAIL"], [[r["kind"], r["name"], r["state"], r["detail"]] for r in rows])
