"""Models-from-code entry point for the intent classifier pyfunc (see :mod:`keel.mlflow_model`)."""

import mlflow

from keel.intents.registry import IntentPyfunc

mlflow.models.set_model(IntentPyfunc())
