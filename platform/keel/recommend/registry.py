"""Register the recommender: a pyfunc that answers top-k item ids for user ids, and the aliases.

The version's lifecycle is :mod:`keel.registry`'s: ``challenger`` always,
``champion`` only when the gate passed, and a failure after the version was
created withdraws it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from keel import registry, storage
from keel.config import RegisterConfig
from keel.recommend.data import ID_FILES
from keel.recommend.evaluate import EVALUATION_FILE
from keel.recommend.recommender import Recommender
from keel.settings import KeelSettings

DEFAULT_K = 10


class RecommenderPyfunc(PythonModel):
    """MLflow pyfunc flavour: a ``user_id`` column (integers or text, as the model's ids) in; items, scores and
    the list's source out."""

    ARTIFACT = "recommender"

    def load_context(self, context: Any) -> None:
        self.recommender = Recommender.load(Path(context.artifacts[self.ARTIFACT]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        k = int((params or {}).get("k", DEFAULT_K))
        return pd.DataFrame(self.recommender.recommend(pd.DataFrame(model_input)["user_id"].tolist(), k))


def _log_model(package_dir: Path) -> str:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    user_ids = pd.read_parquet(package_dir / ID_FILES["user_id"])["id"]
    id_type = "long" if pd.api.types.is_integer_dtype(user_ids) else "string"  # a text-id model is asked in text
    signature = ModelSignature(inputs=Schema([ColSpec(id_type, "user_id")]),
                               params=ParamSchema([ParamSpec("k", "long", DEFAULT_K)]))
    info = mlflow.pyfunc.log_model(
        name="model", python_model=str(Path(__file__).with_name("mlflow_model.py")),
        artifacts={RecommenderPyfunc.ARTIFACT: str(package_dir)}, signature=signature,
        input_example=pd.DataFrame({"user_id": user_ids[:2]}), code_paths=registry.model_code_paths(),
        pip_requirements=registry.model_requirements())
    return str(info.model_uri)


def register_recommender(model_uri: str, evaluation_uri: str, splits_uri: str, config: RegisterConfig,
                         params: dict[str, Any], pipeline_run_id: str, pipeline: str, output_uri: str,
                         settings: KeelSettings) -> dict[str, Any]:
    """Log params, test metrics, the interactions trained on and the pyfunc to the pipeline's MLflow run; register
    a version."""
    with registry.registration(config, pipeline_run_id, pipeline, output_uri, settings) as step:
        evaluation = registry.read_evaluation(evaluation_uri, EVALUATION_FILE, settings)
        k = evaluation["k"]
        mlflow.log_params(registry.flatten_params(params))
        mlflow.log_metrics({f"test_recall_at_{k}": evaluation[f"recall_at_{k}"],
                            f"test_ndcg_at_{k}": evaluation[f"ndcg_at_{k}"]})
        splits = storage.read_manifest(splits_uri, settings)
        train = storage.read_parquet(splits["splits"]["train"], settings)
        registry.log_training_split(train, splits)  # ids numbered as the model numbers them
        package = Recommender.package(
            storage.download_directory(model_uri, step.scratch / "model", settings),
            storage.read_parquet(splits["popularity"], settings), train,
            {column: storage.read_parquet(uri, settings) for column, uri in splits["ids"].items()},
            step.scratch / "recommender")
        return step.publish(config, _log_model(package), evaluation["gate"])
