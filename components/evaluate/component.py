"""KFP component for :func:`keel.evaluate.evaluate`."""

from kfp import dsl
from kfp.dsl import ClassificationMetrics, Metrics, Output

from keel.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def evaluate(model_uri: str, splits_uri: str, config: str, run_name: str, job_id: str,
             metrics: Output[Metrics], classification_metrics: Output[ClassificationMetrics]) -> str:
    """Score the model on the raw test split; metrics and confusion matrix show in the KFP UI."""
    from keel.runs import open_stage

    with open_stage("evaluate", run_name, job_id, config) as run:
        from keel.evaluate import emit_kfp_metrics, evaluate as run_evaluate

        report = run_evaluate(model_uri, splits_uri, run.output_uri, run.settings)
        emit_kfp_metrics(report, metrics, classification_metrics)
    return run.output_uri
