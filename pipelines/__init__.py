"""Keel's pipelines: one directory each, holding the DAG, its config and data contract.

``PIPELINES`` maps a pipeline's name to the module whose ``build()`` returns it;
the CLI, the compile step and the tests look pipelines up here.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from keel.config import PipelineConfigBase
from keel.errors import ConfigError

PIPELINES = {
    "batch_scoring": "pipelines.batch_scoring.pipeline",
    "customer_service_intents": "pipelines.customer_service_intents.pipeline",
    "ecommerce_recommendations": "pipelines.ecommerce_recommendations.pipeline",
    "medical_diagnosis": "pipelines.medical_diagnosis.pipeline",
    "model_performance": "pipelines.model_performance.pipeline",
    "retrain_intents_when_degraded": "pipelines.retrain_intents_when_degraded.pipeline",
    "retrain_recommendations_when_degraded": "pipelines.retrain_recommendations_when_degraded.pipeline",
    "retrain_when_degraded": "pipelines.retrain_when_degraded.pipeline",
}
COMPILED_DIR = Path(__file__).parent / "compiled"
RETRIES = 2


def configure_step(task: Any, config_map: Any, credentials: Any, retries: int, config: PipelineConfigBase) -> Any:
    """Outputs are keyed by run, so caching could only skip work that must run; retries absorb flakes.

    On a cluster each step reads its endpoints from the chart's ConfigMap and its
    credentials from the Secret, and its pod requests the CPU and memory that
    ``config`` gives the step (kfp.local ignores all three: locally the defaults apply).
    """
    from keel.cluster import attach_cluster_config
    from keel.resources import apply_resources

    task.set_caching_options(False)
    if retries:
        task.set_retry(num_retries=retries, backoff_duration="30s", backoff_factor=2.0)
    apply_resources(task, config.step_resources(task.component_spec.name))
    return attach_cluster_config(task, config_map, credentials)


def build(name: str, config_override: Path | None = None, **options: Any) -> Any:
    """The KFP pipeline named ``name``, with ``config_override`` merged into its default config.

    ``options`` go to the pipeline module's ``build`` (``retries=0`` for local runs).
    """
    if name not in PIPELINES:
        raise ConfigError(f"unknown pipeline {name!r}; choose one of {sorted(PIPELINES)}.")
    return importlib.import_module(PIPELINES[name]).build(config_override, **options)
