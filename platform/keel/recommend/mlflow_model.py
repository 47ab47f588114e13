"""Models-from-code entry point for the recommender pyfunc (see :mod:`keel.mlflow_model`)."""

import mlflow

from keel.recommend.registry import RecommenderPyfunc

mlflow.models.set_model(RecommenderPyfunc())
