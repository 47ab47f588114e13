"""KFP component for :func:`keel.batch.score_with_config`."""

from kfp import dsl

from keel.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def batch_predict(model_uri: str, source: str, config: str, run_name: str, job_id: str) -> str:
    """Score every row of ``source`` with a registered model; returns the URI of the predictions' directory."""
    from keel.runs import open_stage

    with open_stage("predict", run_name, job_id, config) as run:
        from keel.batch import score_with_config

        score_with_config(model_uri, source, run.output_uri, run.config, run.settings)
    return run.output_uri
