"""KFP component for :func:`keel.tune.tune_step`: a search runs as a Ray job where there is a Ray cluster."""

from kfp import dsl

from keel.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def tune(splits_uri: str, config: str, run_name: str, job_id: str, gpus: int = 0) -> str:
    """Search the config's hyperparameter space on Ray Tune (TPE + ASHA); returns the output URI."""
    from keel.runs import open_stage

    with open_stage("tune", run_name, job_id, config) as run:
        from keel.tune import tune_step

        tune_step(splits_uri, run.config.train, run.config.tune, gpus, run.output_uri, run.run_id,
                  run.config.pipeline, run.settings)
    return run.output_uri
