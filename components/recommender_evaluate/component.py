"""KFP component for :func:`keel.recommend.evaluate.evaluate_recommender`."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Metrics, Output

from keel.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def recommender_evaluate(model_uri: str, splits_uri: str, config: str, run_name: str, job_id: str,
                         metrics: Output[Metrics]) -> NamedTuple("Evaluated", evaluation_uri=str, gate_passed=bool):
    """Recall@k and NDCG@k against the most-popular baseline, gated on NDCG@k; the KFP UI shows the metrics."""
    from keel.runs import open_stage

    with open_stage("evaluate", run_name, job_id, config) as run:
        from keel import tracking
        from keel.recommend.evaluate import emit_kfp_metrics, evaluate_recommender

        mlflow_run_id = tracking.pipeline_run(run.settings, run.run_id, run.config.pipeline)
        report = evaluate_recommender(model_uri, splits_uri, run.output_uri, run.settings, run.config.evaluate,
                                      run.config.registry, mlflow_run_id)
        emit_kfp_metrics(report, metrics)
    return (run.output_uri, report["gate"]["passed"])
