"""KFP component for :func:`keel.tune.tune` (on the Ray cluster through :func:`keel.jobs.run_stage`)."""

from kfp import dsl

from keel.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def tune(splits_uri: str, config: str, run_name: str, job_id: str, gpus: int = 0) -> str:
    """Search the config's hyperparameter space on Ray Tune (TPE + ASHA); returns the output URI."""
    from keel.runs import open_stage

    with open_stage("tune", run_name, job_id, config) as run:
        from keel import jobs, tracking
        from keel.train.config import with_gpus

        jobs.run_stage("tune", {"splits_uri": splits_uri, "train_config": with_gpus(run.config.train, gpus).model_dump(),
                                "config": run.config.tune.model_dump(), "output_uri": run.output_uri,
                                "run_name": f"tune-{run.run_id}",
                                "mlflow_run_id": tracking.pipeline_run(run.settings, run.run_id, run.config.pipeline)},
                       run.settings)
    return run.output_uri
