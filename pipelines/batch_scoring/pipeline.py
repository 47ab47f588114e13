"""batch_scoring: a registered model over a whole table, for scheduled or one-off batch inference.

Wiring only: one step from ``components/``; what it does lives in
``keel.batch``. Each run writes its predictions under its own artifacts, so a
recurring run (``keel schedule batch_scoring``) keeps every day's scores.
"""

from pathlib import Path
from typing import Any

from kfp import dsl

from components.batch_predict.component import batch_predict
from keel.cluster import CONFIG_MAP, CREDENTIALS_SECRET
from keel.config import load_pipeline_config
from pipelines import RETRIES, configure_step

NAME = "batch-scoring"
DEFAULT_MODEL = "models:/medical-diagnosis@champion"
DEFAULT_SOURCE = "builtin://breast_cancer"
CONFIG_FILE = Path(__file__).parent / "config.yaml"


def build(config_override: Path | None = None, retries: int = RETRIES) -> Any:
    """The pipeline with its config baked in as the ``config`` parameter's default (see medical_diagnosis)."""
    pipeline_config = load_pipeline_config(CONFIG_FILE, config_override)
    default_config = pipeline_config.to_json()

    @dsl.pipeline(name=NAME, description="Score every row of a table with a registered model (default: the "
                                         "medical-diagnosis champion) into Parquet under the run's artifacts.")
    def batch_scoring(model_uri: str = DEFAULT_MODEL, source: str = DEFAULT_SOURCE, run_name: str = "",
                      config_map: str = CONFIG_MAP, credentials_secret: str = CREDENTIALS_SECRET,
                      config: str = default_config) -> str:
        scored = configure_step(
            batch_predict(model_uri=model_uri, source=source, config=config, run_name=run_name,
                          job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER),
            config_map, credentials_secret, retries, pipeline_config)
        return scored.output

    return batch_scoring
