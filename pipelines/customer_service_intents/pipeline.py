"""customer_service_intents: route customer messages by intent with a fine-tuned pretrained transformer.

Wiring only: each step is a component from ``components/``; what a step does
lives in ``keel.intents``. The default source is a seeded generator of
customer-service utterances (personal data included, replaced in the first
step), so the pipeline runs with no download.
"""

from pathlib import Path
from typing import Any

from kfp import dsl

from components.deploy.component import deploy
from components.intent_evaluate.component import intent_evaluate
from components.intent_register.component import intent_register
from components.intent_train.component import intent_train
from components.utterances.component import utterances
from keel.cluster import CONFIG_MAP, CREDENTIALS_SECRET
from keel.config import load_pipeline_config
from keel.intents.prepare import BUILTIN_SOURCE
from pipelines import RETRIES, configure_step

NAME = "customer-service-intents"
CONFIG_FILE = Path(__file__).parent / "config.yaml"


def build(config_override: Path | None = None, retries: int = RETRIES) -> Any:
    """The pipeline with its config baked in as the ``config`` parameter's default (see medical_diagnosis)."""
    pipeline_config = load_pipeline_config(CONFIG_FILE, config_override)
    default_config = pipeline_config.to_json()

    @dsl.pipeline(name=NAME, description="Fine-tune all-MiniLM-L6-v2 on customer-service intents (personal data "
                                         "replaced first), compress it, gate it on held-out macro-F1 against the "
                                         "champion and a bag-of-words baseline, and register it.")
    def customer_service_intents(source: str = BUILTIN_SOURCE, run_name: str = "", serve: bool = False,
                                 serve_port: int = 8000, config_map: str = CONFIG_MAP,
                                 credentials_secret: str = CREDENTIALS_SECRET, config: str = default_config) -> str:
        run = {"config": config, "run_name": run_name, "job_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}

        def step(task: Any) -> Any:
            return configure_step(task, config_map, credentials_secret, retries, pipeline_config)

        prepared = step(utterances(source=source, **run))
        trained = step(intent_train(splits_uri=prepared.output, **run))
        evaluated = step(intent_evaluate(model_uri=trained.output, splits_uri=prepared.output, **run))
        registered = step(intent_register(evaluation_uri=evaluated.outputs["evaluation_uri"], **run))
        with dsl.If(serve == True, name="serving-requested"):  # noqa: E712 - KFP conditions compare with ==
            with dsl.If(registered.outputs["promoted"] == True, name="new-champion"):  # noqa: E712
                step(deploy(model_version_uri=registered.outputs["model_version_uri"], port=serve_port, **run))
            # approval: manual: the version that passed waits for a person, as the champion's shadow or canary
            with dsl.If(registered.outputs["awaiting_approval"] == True, name="awaiting-approval"):  # noqa: E712
                step(deploy(model_version_uri=registered.outputs["model_version_uri"], port=serve_port,
                            awaiting_approval=True, **run))
        return registered.outputs["model_version_uri"]

    return customer_service_intents
