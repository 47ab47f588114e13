"""KFP component for :func:`keel.recommend.registry.register_recommender`."""

from typing import NamedTuple

from kfp import dsl

from keel.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def recommender_register(model_uri: str, evaluation_uri: str, splits_uri: str, config: str, run_name: str,
                         job_id: str) -> NamedTuple("Registered", model_version_uri=str, promoted=bool,
                                                      awaiting_approval=bool):
    """Log the top-k pyfunc to MLflow, register a version, move challenger/champion aliases."""
    from keel.runs import open_stage

    with open_stage("register", run_name, job_id, config) as run:
        from keel.recommend.registry import register_recommender

        registered = register_recommender(model_uri, evaluation_uri, splits_uri, run.config.registry,
                                          run.config.model_dump(mode="json"), run.run_id, run.config.pipeline,
                                          run.output_uri, run.settings)
    return (registered["model_uri"], registered["promoted"], registered["awaiting_approval"])
