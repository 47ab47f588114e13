"""KFP component for :func:`keel.intents.registry.register_intents`."""

from typing import NamedTuple

from kfp import dsl

from keel.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def intent_register(evaluation_uri: str, config: str, run_name: str,
                    job_id: str) -> NamedTuple("Registered", model_version_uri=str, promoted=bool,
                                                      awaiting_approval=bool):
    """Log the chosen variant as a text-in pyfunc to MLflow, register a version, move challenger/champion."""
    from keel.runs import open_stage

    with open_stage("register", run_name, job_id, config) as run:
        from keel.intents.registry import register_intents

        registered = register_intents(evaluation_uri, run.config.registry, run.config.model_dump(mode="json"),
                                      run.run_id, run.config.pipeline, run.output_uri, run.settings)
    return (registered["model_uri"], registered["promoted"], registered["awaiting_approval"])
