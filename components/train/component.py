"""KFP component for :func:`keel.train.trainer.train`."""

from kfp import dsl

from keel.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def train(splits_uri: str, tuning_uri: str, config: str, run_name: str, job_id: str) -> str:
    """Train the MLP on Ray Train (the tuned config, if any) with per-epoch checkpoints; returns the model's URI."""
    from keel.runs import open_stage

    with open_stage("train", run_name, job_id, config) as run:
        from keel import storage, tracking
        from keel.train.trainer import train as run_train
        from keel.tune import tuned_train_config

        mlflow_run_id = tracking.pipeline_run(run.settings, run.run_id, run.config.pipeline)
        train_config = tuned_train_config(run.config.train, storage.read_manifest(tuning_uri, run.settings))
        run_train(splits_uri, train_config, run.output_uri, storage.join(run.run_uri, "checkpoints"),
                  run.settings, run_name=f"train-{run.run_id}", mlflow_run_id=mlflow_run_id)
    return run.output_uri
