"""retrain_intents_when_degraded: check the intent classifier on late labels; retrain it when it got worse.

Wiring only, as retrain_when_degraded: the model_performance check (for a text
classifier: macro-F1 on labeled messages, scored as served), then, under
``dsl.If`` on its ``degraded`` output, the whole customer_service_intents
pipeline as a sub-DAG. A successor still has to pass that pipeline's gate
against the champion to replace it.
"""

from pathlib import Path
from typing import Any

from keel.config import load_pipeline_config
from keel.intents.prepare import BUILTIN_SOURCE
from pipelines import RETRIES
from pipelines.customer_service_intents import pipeline as customer_service_intents
from pipelines.retrain_when_degraded.pipeline import build_retraining

NAME = "retrain-intents-when-degraded"
DEFAULT_MODEL = "models:/customer-service-intents@champion"


def build(config_override: Path | None = None, retries: int = RETRIES) -> Any:
    """``config_override`` merges over the training config (customer_service_intents'); the check's own config
    is the ``check_config`` parameter, model_performance's by default."""
    return build_retraining(
        customer_service_intents.build(config_override, retries),
        load_pipeline_config(customer_service_intents.CONFIG_FILE, config_override), NAME,
        "Check the customer-service-intents champion on labeled messages; when it is degraded, run the "
        "customer_service_intents pipeline to fine-tune, compress, gate and register a successor.",
        DEFAULT_MODEL, BUILTIN_SOURCE, retries)
