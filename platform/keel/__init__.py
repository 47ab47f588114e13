"""Keel: Kubernetes-native MLOps on Kubeflow Pipelines, Ray and MLflow.

Concepts and where they live:

- Settings (:class:`KeelSettings`, :func:`load_settings`): the one
  configuration object, from ``KEEL_*`` variables; local or cluster mode.
- Stages, plain functions over URIs and typed configs, one module each:
  ``keel.data.ingest.ingest`` -> ``keel.data.validate.validate`` ->
  ``keel.data.preprocess.preprocess`` -> ``keel.tune.tune`` ->
  ``keel.train.trainer.train`` -> ``keel.compress.compress`` ->
  ``keel.evaluate.evaluate`` (the promotion gate: ``keel.gate.decide``) ->
  ``keel.registry.register``.
- Storage (``keel.storage``): URIs (paths, ``s3://``, ``http(s)://``) and
  atomic stage outputs; tracking (``keel.tracking``): one MLflow run per
  pipeline run.
- Configs: :class:`PipelineConfig` holds a :class:`DataContract`,
  :class:`PreprocessConfig`, :class:`TuneConfig`, :class:`TrainConfig`,
  :class:`CompressConfig`, :class:`EvaluateConfig` (with its
  :class:`GateConfig`) and :class:`RegisterConfig`.
- Recommendations (``keel.recommend``, the ``ecommerce_recommendations``
  pipeline): ``keel.recommend.data.prepare`` ->
  ``keel.recommend.train.train_recommender`` ->
  ``keel.recommend.evaluate.evaluate_recommender`` ->
  ``keel.recommend.registry.register_recommender``, configured by
  :class:`RecommendPipelineConfig`; :class:`Recommender` answers top-k.
- Intents (``keel.intents``, the ``customer_service_intents`` pipeline):
  ``keel.intents.prepare.prepare_utterances`` (privacy: ``keel.intents.privacy``)
  -> ``keel.intents.train.train_intents`` ->
  ``keel.intents.evaluate.evaluate_intents`` (baseline, variants, gate) ->
  ``keel.intents.registry.register_intents``, configured by
  :class:`IntentsPipelineConfig`; :class:`IntentModel` answers text.
- Scoring: :class:`Predictor` (feature transform + network), which evaluation,
  the MLflow pyfunc and serving share.
- Serving (``keel.serve``): ``keel.serve.config`` (``ServeConfig``, the
  shadow's and canary's settings, the Serve config document),
  ``keel.serve.deployment`` (Ray Serve deployments), ``keel.serve.app`` (the
  HTTP API), ``keel.serve.control`` (deploy, roll and stop through Serve's REST
  API), ``keel.serve.shadow`` (a challenger scoring copies of the champion's
  rows), ``keel.serve.canary`` (a challenger answering a share of its requests)
  and ``keel.serve.challenger`` (what the two share).
- Errors: :class:`KeelError` and its subclasses; messages say what to fix.

Names resolve lazily so that ``import keel`` stays cheap: a component that
only ingests data never imports torch, Ray or MLflow.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "KeelSettings": "keel.settings",
    "load_settings": "keel.settings",
    "KeelError": "keel.errors",
    "ConfigError": "keel.errors",
    "DataError": "keel.errors",
    "DataContractError": "keel.errors",
    "StorageError": "keel.errors",
    "TrainingError": "keel.errors",
    "RegistryError": "keel.errors",
    "TuningError": "keel.errors",
    "CompressionError": "keel.errors",
    "EvaluationError": "keel.errors",
    "PipelineConfig": "keel.config",
    "TuneConfig": "keel.config",
    "CompressConfig": "keel.config",
    "EvaluateConfig": "keel.config",
    "GateConfig": "keel.config",
    "RegisterConfig": "keel.config",
    "DataContract": "keel.data.contract",
    "PreprocessConfig": "keel.data.preprocess",
    "TrainConfig": "keel.train.config",
    "Predictor": "keel.predictor",
    "RecommendPipelineConfig": "keel.recommend.config",
    "Recommender": "keel.recommend.recommender",
    "IntentsPipelineConfig": "keel.intents.config",
    "IntentModel": "keel.intents.model",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'keel' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
