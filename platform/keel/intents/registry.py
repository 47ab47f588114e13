"""Register the intent classifier: a pyfunc that takes raw text and answers intent and probability.

The version's lifecycle is :func:`keel.registry.registration`'s: ``challenger``
always, ``champion`` only when the gate passed, withdrawn if the step fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from keel import registry, storage
from keel.config import RegisterConfig
from keel.intents.model import IntentModel
from keel.settings import KeelSettings

EXAMPLE = ["where is my order <ORDER_ID>", "I want a refund please"]


class IntentPyfunc(PythonModel):
    """MLflow pyfunc flavour: a ``text`` column in (scrubbed before use); ``intent`` and ``probability`` out."""

    ARTIFACT = "intents"

    def load_context(self, context: Any) -> None:
        self.intents = IntentModel.load(Path(context.artifacts[self.ARTIFACT]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return pd.DataFrame(self.intents.classify([str(t) for t in pd.DataFrame(model_input)["text"]]))


def _log_model(model_dir: Path) -> str:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    signature = ModelSignature(inputs=Schema([ColSpec("string", "text")]),
                               outputs=Schema([ColSpec("string", "intent"), ColSpec("double", "probability")]))
    info = mlflow.pyfunc.log_model(
        name="model", python_model=str(Path(__file__).with_name("mlflow_model.py")),
        artifacts={IntentPyfunc.ARTIFACT: str(model_dir)}, signature=signature,
        input_example=pd.DataFrame({"text": EXAMPLE}), code_paths=registry.model_code_paths(),
        pip_requirements=registry.model_requirements("transformers", "tokenizers"))
    return str(info.model_uri)


def _log_utterances(splits_uri: str, settings: KeelSettings) -> None:
    """The utterances the model was fine-tuned on, personal data already replaced, as the run's training
    dataset (MLflow's Datasets tab and ``keel models show``): their text and intent columns, by schema and
    digest; MLflow keeps no rows of it."""
    splits = storage.read_manifest(splits_uri, settings)
    train = storage.read_parquet(splits["splits"]["train"], settings)[["text", "intent"]]
    registry.log_training_split(train, splits, target="intent")


def register_intents(evaluation_uri: str, config: RegisterConfig, params: dict[str, Any], pipeline_run_id: str,
                     pipeline: str, output_uri: str, settings: KeelSettings) -> dict[str, Any]:
    """Log params, test metrics, the utterances trained on and the chosen variant's pyfunc to the pipeline's MLflow
    run; register it."""
    # here, not at the top: the model's loader imports this module, and the evaluate stage's imports reach Ray
    from keel.intents.evaluate import EVALUATION_FILE, MODEL_DIR

    with registry.registration(config, pipeline_run_id, pipeline, output_uri, settings) as step:
        evaluation = registry.read_evaluation(evaluation_uri, EVALUATION_FILE, settings)
        mlflow.log_params(registry.flatten_params(params))
        mlflow.log_metrics({"test_f1_macro": evaluation["f1_macro"], "test_accuracy": evaluation["accuracy"],
                            "test_fine_tuned_f1_macro": evaluation["fine_tuned"]["f1_macro"],
                            "test_baseline_bow_f1_macro": evaluation["baseline_bag_of_words"]["f1_macro"]})
        mlflow.set_tag("keel.variant", evaluation["chosen"])
        splits_uri = storage.read_manifest(evaluation_uri, settings).get("splits_uri")
        if splits_uri:  # an evaluation published before it recorded its splits has nothing to point at
            _log_utterances(splits_uri, settings)
        model_dir = storage.download_directory(storage.join(evaluation_uri, MODEL_DIR), step.scratch / "model", settings)
        return step.publish(config, _log_model(model_dir), evaluation["gate"])
