"""KFP component for :func:`keel.compress.compress`."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Output

from keel.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def compress(model_uri: str, splits_uri: str, config: str, run_name: str, job_id: str,
             report: Output[HTML]) -> NamedTuple("Compressed", compress_uri=str, model_uri=str):
    """Prune, quantize and distill the model, measure every variant, pick one by the policy."""
    from keel.runs import open_stage

    with open_stage("compress", run_name, job_id, config) as run:
        from pathlib import Path

        from keel import storage, tracking
        from keel.compress import compress as run_compress

        mlflow_run_id = tracking.pipeline_run(run.settings, run.run_id, run.config.pipeline)
        manifest = run_compress(model_uri, splits_uri, run.config.compress, run.output_uri, run.settings,
                                mlflow_run_id=mlflow_run_id)
        storage.download(manifest["report_html"], Path(report.path), run.settings)
    return (run.output_uri, manifest["model_uri"])
