"""KFP component for :func:`keel.intents.evaluate.evaluate_intents`."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Metrics, Output

from keel.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def intent_evaluate(model_uri: str, splits_uri: str, config: str, run_name: str, job_id: str,
                    metrics: Output[Metrics], report: Output[HTML]) -> NamedTuple("Evaluated", evaluation_uri=str,
                                                                                  gate_passed=bool):
    """Compressed variants and a bag-of-words baseline on held-out phrasings; choose one, gate it on macro-F1."""
    from keel.runs import open_stage

    with open_stage("evaluate", run_name, job_id, config) as run:
        from pathlib import Path

        from keel import storage, tracking
        from keel.compress import REPORT_HTML
        from keel.intents.evaluate import emit_kfp_metrics, evaluate_intents

        mlflow_run_id = tracking.pipeline_run(run.settings, run.run_id, run.config.pipeline)
        evaluation = evaluate_intents(model_uri, splits_uri, run.output_uri, run.settings, run.config.compress,
                                      run.config.evaluate, run.config.registry, mlflow_run_id)
        emit_kfp_metrics(evaluation, metrics)
        storage.download(storage.join(run.output_uri, REPORT_HTML), Path(report.path), run.settings)
    return (run.output_uri, evaluation["gate"]["passed"])
