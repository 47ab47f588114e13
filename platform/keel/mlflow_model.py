"""Models-from-code entry point for Keel's pyfunc models.

MLflow copies this file into every logged model and runs it on load, instead
of unpickling a Python object: loading a model executes only this reviewed code.
"""

import mlflow

from keel.registry import KeelPyfunc

mlflow.models.set_model(KeelPyfunc())
