"""KFP component for :func:`keel.train.trainer.train` (on the Ray cluster through :func:`keel.jobs.run_stage`)."""

from kfp import dsl

from keel.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def train(splits_uri: str, tuning_uri: str, config: str, run_name: str, job_id: str, gpus: int = 0) -> str:
    """Train the MLP on Ray Train (the tuned config, if any; on ``gpus`` GPU workers when > 0); returns the model URI."""
    from keel.runs import open_stage

    with open_stage("train", run_name, job_id, config) as run:
        from keel import jobs, storage, tracking
        from keel.train.config import with_gpus
        from keel.tune import tuned_train_config

        train_config = with_gpus(tuned_train_config(run.config.train, storage.read_manifest(tuning_uri, run.settings)), gpus)
        jobs.run_stage("train", {"splits_uri": splits_uri, "config": train_config.model_dump(),
                                 "output_uri": run.output_uri, "checkpoint_uri": storage.join(run.run_uri, "checkpoints"),
                                 "run_name": f"train-{run.run_id}",
                                 "mlflow_run_id": tracking.pipeline_run(run.settings, run.run_id, run.config.pipeline)},
                       run.settings)
    return run.output_uri
