"""KFP component for :func:`keel.monitor.performance.check_with_config`."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, ClassificationMetrics, Metrics, Output

from keel.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def check_performance(model_uri: str, source: str, config: str, run_name: str, job_id: str,
                      metrics: Output[Metrics], classification_metrics: Output[ClassificationMetrics],
                      report: Output[HTML], training_config: str = ""
                      ) -> NamedTuple("Checked", performance_uri=str, degraded=bool):
    """Score the labeled rows of ``source`` with a registered model and judge them against its registration;
    the KFP UI shows the metrics, a classifier's confusion matrix, and the report. ``training_config``: in a
    retraining pipeline, the config a degraded verdict trains with (it must register the checked model)."""
    from keel.runs import open_stage

    with open_stage("check", run_name, job_id, config) as run:
        from pathlib import Path

        from keel import storage
        from keel.evaluate import REPORT_HTML
        from keel.monitor.performance import check_with_config
        from keel.monitor.verdict import PERFORMANCE_FILE, emit_kfp_check

        checked = check_with_config(model_uri, source, run.output_uri, run.config, run.settings, training_config)
        emit_kfp_check(storage.read_json(storage.join(run.output_uri, PERFORMANCE_FILE), run.settings), metrics,
                       classification_metrics)
        storage.download(storage.join(run.output_uri, REPORT_HTML), Path(report.path), run.settings)
    return (run.output_uri, checked["verdict"] == "degraded")
