"""medical_diagnosis: benign or malignant from cell-nucleus measurements.

Wiring only: each step is a component from ``components/``; what a step does
lives in ``keel``. The default source is scikit-learn's bundled breast-cancer
table, so the pipeline runs with no download.
"""


from pathlib import Path
from typing import Any

from kfp import dsl

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

NAME = "medical-diagnosis"
DEFAULT_SOURCE = "builtin://breast_cancer"
CONFIG_FILE = Path(__file__).parent / "config.yaml"
RETRIES = 2


def _configure(task: Any) -> Any:
    """Outputs are keyed by run, so caching could only skip work that must run; retries absorb flakes."""
    task.set_caching_options(False)
    task.set_retry(num_retries=RETRIES, backoff_duration="30s", backoff_factor=2.0)
    return task


def build(config_override: Path | None = None) -> Any:
    """The pipeline with its config baked in, as sorted JSON, as the ``config`` parameter's default.

    JSON text rather than a struct parameter: KFP writes struct defaults in
    hash order, which would make the compiled YAML differ on every compile.
    """
    default_config = load_pipeline_config(CONFIG_FILE, config_override).to_json()

    @dsl.pipeline(name=NAME, description="Tune, train, compress, evaluate (gated) and register a breast-cancer diagnosis classifier.")
    def medical_diagnosis(source: str = DEFAULT_SOURCE, run_name: str = "", serve: bool = False,
                          serve_port: int = 8000, config: str = default_config) -> str:
        run = {"config": config, "run_name": run_name, "job_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}
        ingested = _configure(ingest(source=source, **run))
        validated = _configure(validate(dataset_uri=ingested.output, **run))
        prepared = _configure(preprocess(dataset_uri=ingested.output, **run)).after(validated)
        tuned = _configure(tune(splits_uri=prepared.output, **run))
        trained = _configure(train(splits_uri=prepared.output, tuning_uri=tuned.output, **run))
        compressed = _configure(compress(model_uri=trained.output, splits_uri=prepared.output, **run))
        chosen = compressed.outputs["model_uri"]
        evaluated = _configure(evaluate(model_uri=chosen, splits_uri=prepared.output, **run))
        registered = _configure(register(model_uri=chosen, evaluation_uri=evaluated.outputs["evaluation_uri"],
                                         dataset_uri=ingested.output, splits_uri=prepared.output, **run))
        with dsl.If(serve == True, name="serving-requested"):  # noqa: E712 - KFP conditions compare with ==
            with dsl.If(registered.outputs["promoted"] == True, name="new-champion"):  # noqa: E712
                _configure(deploy(model_version_uri=registered.outputs["model_version_uri"], port=serve_port, **run))
        return registered.outputs["model_version_uri"]

    return medical_diagnosis
