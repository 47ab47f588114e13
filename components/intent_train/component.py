"""KFP component for :func:`keel.intents.train.train_intents` (on the Ray cluster through :func:`keel.jobs.run_stage`)."""

from kfp import dsl

from keel.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def intent_train(splits_uri: str, config: str, run_name: str, job_id: str) -> str:
    """Fine-tune all-MiniLM-L6-v2 with a classification head on Ray Train; returns the model URI."""
    from keel.runs import open_stage

    with open_stage("train", run_name, job_id, config) as run:
        from keel import jobs, storage

        jobs.run_stage("intent_train", {"splits_uri": splits_uri, "config": run.config.train.model_dump(),
                                        "output_uri": run.output_uri, "run_name": f"train-{run.run_id}",
                                        "checkpoint_uri": storage.join(run.run_uri, "checkpoints")},
                       run.settings)
    return run.output_uri
