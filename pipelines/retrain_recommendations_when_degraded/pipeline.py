"""retrain_recommendations_when_degraded: check the recommender on later interactions; retrain it when worse.

Wiring only, as retrain_when_degraded: the model_performance check (for a
recommender: NDCG@k on the interactions that came in since it was registered),
then, under ``dsl.If`` on its ``degraded`` output, the whole
ecommerce_recommendations pipeline as a sub-DAG. A successor still has to
pass that pipeline's gate against the champion to replace it.
"""

from pathlib import Path
from typing import Any

from keel.config import load_pipeline_config
from keel.recommend.data import BUILTIN_SOURCE
from pipelines import RETRIES
from pipelines.ecommerce_recommendations import pipeline as ecommerce_recommendations
from pipelines.retrain_when_degraded.pipeline import build_retraining

NAME = "retrain-recommendations-when-degraded"
DEFAULT_MODEL = "models:/ecommerce-recommendations@champion"


def build(config_override: Path | None = None, retries: int = RETRIES) -> Any:
    """``config_override`` merges over the training config (ecommerce_recommendations'); the check's own config
    is the ``check_config`` parameter, model_performance's by default."""
    return build_retraining(
        ecommerce_recommendations.build(config_override, retries),
        load_pipeline_config(ecommerce_recommendations.CONFIG_FILE, config_override), NAME,
        "Check the ecommerce-recommendations champion on the interactions that came in since; when it is "
        "degraded, run the ecommerce_recommendations pipeline to train, gate and register a successor.",
        DEFAULT_MODEL, BUILTIN_SOURCE, retries)
