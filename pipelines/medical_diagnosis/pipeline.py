"""medical_diagnosis: benign or malignant from cell-nucleus measurements.

Wiring only: each step is a component from ``components/``; what a step does
lives in ``keel``. The default source is scikit-learn's bundled breast-cancer
table, so the pipeline runs with no download.
"""


from pathlib import Path
from typing import Any

from kfp import dsl

from keel.cluster import CONFIG_MAP, CREDENTIALS_SECRET

from components.deploy.component import deploy
from components.compress.component import compress
from components.evaluate.component import evaluate
from components.ingest.component import ingest
from components.preprocess.component import preprocess
from components.register.component import register
from components.train.component import train
from components.tune.component import tune
from components.validate.component import validate
from keel.config import load_pipeline_config
from pipelines import RETRIES, configure_step

NAME = "medical-diagnosis"
DEFAULT_SOURCE = "builtin://breast_cancer"
CONFIG_FILE = Path(__file__).parent / "config.yaml"


def build(config_override: Path | None = None, retries: int = RETRIES) -> Any:
    """The pipeline with its config baked in, as sorted JSON, as the ``config`` parameter's default.

    JSON text rather than a struct parameter: KFP writes struct defaults in
    hash order, which would make the compiled YAML differ on every compile.
    ``retries=0`` is for kfp.local, which honours retry policies: a bad input
    there should fail at once, not after minutes of backoff.
    """
    pipeline_config = load_pipeline_config(CONFIG_FILE, config_override)
    default_config = pipeline_config.to_json()

    @dsl.pipeline(name=NAME, description="Tune, train, compress, evaluate (gated) and register a breast-cancer diagnosis classifier.")
    def medical_diagnosis(source: str = DEFAULT_SOURCE, run_name: str = "", serve: bool = False,
                          serve_port: int = 8000, gpus: int = 0, config_map: str = CONFIG_MAP,
                          credentials_secret: str = CREDENTIALS_SECRET, config: str = default_config) -> str:
        run = {"config": config, "run_name": run_name, "job_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}

        def step(task: Any) -> Any:
            return configure_step(task, config_map, credentials_secret, retries, pipeline_config)

        ingested = step(ingest(source=source, **run))
        validated = step(validate(dataset_uri=ingested.output, **run))
        prepared = step(preprocess(dataset_uri=ingested.output, **run)).after(validated)
        tuned = step(tune(splits_uri=prepared.output, gpus=gpus, **run))
        trained = step(train(splits_uri=prepared.output, tuning_uri=tuned.output, gpus=gpus, **run))
        compressed = step(compress(model_uri=trained.output, splits_uri=prepared.output, **run))
        chosen = compressed.outputs["model_uri"]
        evaluated = step(evaluate(model_uri=chosen, splits_uri=prepared.output, **run))
        registered = step(register(model_uri=chosen, evaluation_uri=evaluated.outputs["evaluation_uri"],
                                   dataset_uri=ingested.output, splits_uri=prepared.output, **run))
        with dsl.If(serve == True, name="serving-requested"):  # noqa: E712 - KFP conditions compare with ==
            with dsl.If(registered.outputs["promoted"] == True, name="new-champion"):  # noqa: E712
                step(deploy(model_version_uri=registered.outputs["model_version_uri"], port=serve_port, **run))
            # approval: manual: the version that passed waits for a person, as the champion's shadow or canary
            with dsl.If(registered.outputs["awaiting_approval"] == True, name="awaiting-approval"):  # noqa: E712
                step(deploy(model_version_uri=registered.outputs["model_version_uri"], port=serve_port,
                            awaiting_approval=True, **run))
        return registered.outputs["model_version_uri"]

    return medical_diagnosis
