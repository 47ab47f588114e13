"""model_performance: a registered model on rows whose labels came in late, against its own registration.

Wiring only: one step from ``components/``; what it does lives in
``keel.monitor.performance``. Scheduled (``keel schedule model_performance``)
it is the check that drift metrics cannot make: whether the answers are still
right. Its ``degraded`` output and the ``KeelModelDegraded`` alert say when not.
"""

from pathlib import Path
from typing import Any

from kfp import dsl

from components.check_performance.component import check_performance
from keel.cluster import CONFIG_MAP, CREDENTIALS_SECRET
from keel.config import load_pipeline_config
from pipelines import RETRIES, configure_step

NAME = "model-performance"
DEFAULT_MODEL = "models:/medical-diagnosis@champion"
DEFAULT_SOURCE = "builtin://breast_cancer"
CONFIG_FILE = Path(__file__).parent / "config.yaml"


def build(config_override: Path | None = None, retries: int = RETRIES) -> Any:
    """The pipeline with its config baked in as the ``config`` parameter's default (see medical_diagnosis)."""
    pipeline_config = load_pipeline_config(CONFIG_FILE, config_override)
    default_config = pipeline_config.to_json()

    @dsl.pipeline(name=NAME, description="Check a registered model (default: the medical-diagnosis champion) on "
                                         "labeled rows against the evaluation it was registered on.")
    def model_performance(model_uri: str = DEFAULT_MODEL, source: str = DEFAULT_SOURCE, run_name: str = "",
                          config_map: str = CONFIG_MAP, credentials_secret: str = CREDENTIALS_SECRET,
                          config: str = default_config) -> bool:
        checked = configure_step(
            check_performance(model_uri=model_uri, source=source, config=config, run_name=run_name,
                              job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER),
            config_map, credentials_secret, retries, pipeline_config)
        return checked.outputs["degraded"]

    return model_performance
