"""KFP component for :func:`keel.tune.tune`."""

from kfp import dsl

from keel.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def tune(splits_uri: str, config: str, run_name: str, job_id: str) -> str:
    """Search the config's hyperparameter space on Ray Tune (TPE + ASHA); returns the output URI."""
    from keel.runs import open_stage

    with open_stage("tune", run_name, job_id, config) as run:
        from keel import tracking
        from keel.tune import tune as run_tune

        mlflow_run_id = tracking.pipeline_run(run.settings, run.run_id, run.config.pipeline)
        run_tune(splits_uri, run.config.train, run.config.tune, run.output_uri, run.settings,
                 run_name=f"tune-{run.run_id}", mlflow_run_id=mlflow_run_id)
    return run.output_uri
