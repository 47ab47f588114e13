"""retrain_recommendations_when_degraded: check the recommender on later interactions; retrain it when worse.

Wiring only, as retrain_when_degraded: the model_performance check (for a
recommender: NDCG@k on the interactions that came in since it was registered),
then, under ``dsl.If`` on its ``degraded`` output, the whole
ecommerce_recommendations pipeline as a sub-DAG. A successor still has to
pass that pipeline's gate against the champion to replace it.
"""

from pathlib import Path
from typing import Any

from kfp import dsl

from keel.cluster import CONFIG_MAP, CREDENTIALS_SECRET
from keel.recommend.data import BUILTIN_SOURCE
from pipelines import RETRIES
from pipelines.ecommerce_recommendations import pipeline as ecommerce_recommendations
from pipelines.retrain_when_degraded.pipeline import default_check_config, when_degraded

NAME = "retrain-recommendations-when-degraded"
DEFAULT_MODEL = "models:/ecommerce-recommendations@champion"


def build(config_override: Path | None = None, retries: int = RETRIES) -> Any:
    """``config_override`` merges over the training config (ecommerce_recommendations'); the check's own config
    is the ``check_config`` parameter, model_performance's by default."""
    training = ecommerce_recommendations.build(config_override, retries)

    @dsl.pipeline(name=NAME, description="Check the ecommerce-recommendations champion on the interactions that "
                                         "came in since; when it is degraded, run the ecommerce_recommendations "
                                         "pipeline to train, gate and register a successor.")
    def retrain_recommendations_when_degraded(
            labels_source: str, model_uri: str = DEFAULT_MODEL, source: str = BUILTIN_SOURCE, run_name: str = "",
            retrain: bool = True, serve: bool = False, serve_port: int = 8000, config_map: str = CONFIG_MAP,
            credentials_secret: str = CREDENTIALS_SECRET, check_config: str = default_check_config(),
            config: str = training.component_spec.inputs["config"].default) -> str:
        with when_degraded(model_uri, labels_source, check_config, run_name, retrain, config_map,
                           credentials_secret, retries) as checked:
            training(source=source, run_name=run_name, serve=serve, serve_port=serve_port, config_map=config_map,
                     credentials_secret=credentials_secret, config=config)
        return checked.outputs["performance_uri"]

    return retrain_recommendations_when_degraded
