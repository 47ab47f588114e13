"""The ``keel`` command: one Typer root, one module per command group.

:func:`main` is the only place that catches :class:`~keel.errors.KeelError`:
it prints the headline and exits 1, with no traceback.
"""

from __future__ import annotations

import os
import sys

import typer

from keel.cli import compile as compile_commands
from keel.cli import cluster, contract, evaluate, models, predict, run, serve
from keel.errors import KeelError
from keel.signals import sigterm_raises

app = typer.Typer(name="keel", help="Keel: KFP pipelines, Ray training and an MLflow registry.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
# What a bug report needs: Keel's version and the stack's, read from the installed packages' metadata (importing
# Ray or torch to ask them would cost seconds).
STACK_PACKAGES = ("kfp", "ray", "mlflow", "torch", "minio", "prometheus-client", "kubernetes")


def version_lines() -> list[str]:
    """``keel 0.1.0``, the Python running it, then each package of the stack with the version installed."""
    from importlib import metadata

    from keel import __version__

    def installed(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    return [f"keel {__version__}", f"Python {sys.version.split()[0]}",
            *(f"{package} {installed(package)}" for package in STACK_PACKAGES)]


def _print_version(value: bool) -> None:
    if value:
        print("\n".join(version_lines()))
        raise typer.Exit()


@app.callback()
def keel_options(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                              help="Print Keel's version and its stack's (for a bug report).")) -> None:
    """The root's own options, before any command: ``--version``."""


app.command(name="run", help="Run a pipeline locally with kfp.local.")(run.run_pipeline)
app.add_typer(compile_commands.app, name="pipelines")
app.add_typer(models.app, name="models")
app.add_typer(contract.app, name="contract")
app.command(name="predict", help="Score a table with a registered model (batch inference).")(predict.predict_command)
app.command(name="evaluate", help="Check a registered model on labeled rows against what it was registered on.")(
    evaluate.evaluate_command)
app.command(name="serve", help="Serve a registered model with Ray Serve; `keel serve status|stop`.")(serve.serve_command)
app.command(name="submit", help="Upload a pipeline version to Kubeflow Pipelines and start a run.")(cluster.submit_command)
app.command(name="schedule", help="Schedule a pipeline on Kubeflow Pipelines, replacing the recurring run of the "
                                  "same name; `keel schedule list`.")(cluster.schedule_command)
app.command(name="status", help="State of Keel's Ray, MLflow and MinIO resources on the cluster.")(cluster.status_command)


def main() -> None:
    # The commands print their own summaries; MLflow's download bars (one per model or report fetched) only
    # interleave with them on stderr. A user who wants the bars sets the variable.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        with sigterm_raises():  # `kill` ends a command as an error does: its outputs are left whole or absent
            app()
    except KeelError as e:
        print(f"keel: error: {e.headline}", file=sys.stderr)
        sys.exit(1)
