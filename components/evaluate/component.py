"""KFP component for :func:`keel.evaluate.evaluate`."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, ClassificationMetrics, Metrics, Output

from keel.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def evaluate(model_uri: str, splits_uri: str, config: str, run_name: str, job_id: str,
             metrics: Output[Metrics], classification_metrics: Output[ClassificationMetrics],
             report: Output[HTML]) -> NamedTuple("Evaluated", evaluation_uri=str, gate_passed=bool):
    """Score the model and its slices, gate it against the champion; the KFP UI shows metrics and report."""
    from keel.runs import open_stage

    with open_stage("evaluate", run_name, job_id, config) as run:
        from pathlib import Path

        from keel import storage, tracking
        from keel.evaluate import REPORT_HTML, emit_kfp_metrics, evaluate as run_evaluate

        mlflow_run_id = tracking.pipeline_run(run.settings, run.run_id, run.config.pipeline)
        result = run_evaluate(model_uri, splits_uri, run.output_uri, run.settings, run.config.evaluate,
                              run.config.registry, mlflow_run_id)
        emit_kfp_metrics(result, metrics, classification_metrics)
        storage.download(storage.join(run.output_uri, REPORT_HTML), Path(report.path), run.settings)
    return (run.output_uri, result["gate"]["passed"])
