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

# Each parameter's description, compiled into the IR where KFP keeps a docstring's (inputDefinitions), for whoever
# starts a run from the compiled YAML: the Kubeflow UI's run form, a CI job, a person reading it.
PARAMETERS = {
    "run_name": "names the run's outputs and its MLflow run; empty: the KFP run's id",
    "serve": "end with a deploy step that serves the model, when this run made it the new champion",
    "serve_port": "HTTP port the served model answers on (1-65535)",
    "gpus": "GPU workers for tuning and training; 0 trains on CPUs",
    "config_map": "the ConfigMap of Keel's settings that the Helm chart created",
    "credentials_secret": "the Secret of credentials that the Helm chart created",
    "config": "the pipeline's config as JSON (keel pipelines compile --config FILE bakes yours in)",
    "model_uri": "a registered model: models:/NAME@champion, or models:/NAME/N for one version",
    "labels_source": "labeled rows to check the model on: its input columns and its label column (s3://, http(s)://)",
    "check_config": "the labels check's config as JSON: tolerance, fewest rows, the file's column names",
    "retrain": "false: only check the model on the labels, never retrain it",
}
TABLE = "CSV, Parquet or JSONL: s3://bucket/key, http(s)://, or a prefix of Parquet parts"
SOURCES = {
    "medical_diagnosis": f"the table to train on ({TABLE}, or builtin://breast_cancer)",
    "batch_scoring": f"the table to score ({TABLE})",
    "customer_service_intents": "the utterances to train on, with text and intent columns (s3://, http(s)://), or "
                                "builtin://customer_service_utterances",
    "ecommerce_recommendations": "the interactions to train on, with user_id, item_id and timestamp columns "
                                 "(s3://, http(s)://), or builtin://ecommerce_interactions",
    "model_performance": f"labeled rows to check the model on: its input columns and its label column ({TABLE})",
}
RETRAINING_SOURCE = "what a retraining trains on: the table your data team keeps current, with the new labels in it"


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
    return describe_parameters(importlib.import_module(PIPELINES[name]).build(config_override, **options), name)


def describe_parameters(built: Any, name: str) -> Any:
    """Each parameter's description in the pipeline's IR: bare names (``config_map``, ``source``) left a person
    starting a run from the compiled YAML guessing what to enter."""
    descriptions = {**PARAMETERS, "source": SOURCES.get(name, RETRAINING_SOURCE)}
    for parameter, spec in built.pipeline_spec.root.input_definitions.parameters.items():
        spec.description = descriptions[parameter]
    return built
