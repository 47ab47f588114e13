"""retrain_when_degraded: check the champion on late labels, and only when it got worse, retrain it.

Wiring only: the model_performance check, then, under ``dsl.If`` on its
``degraded`` output, the whole medical_diagnosis pipeline as a sub-DAG (tune,
train, compress, evaluate gated against the champion, register, and serve when
asked). Scheduled (``keel schedule retrain_when_degraded``), it is continuous
training that spends GPUs only when labels say the model needs it; the new
version still has to beat the champion on the gate to replace it.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kfp import dsl

from components.check_performance.component import check_performance
from keel.cluster import CONFIG_MAP, CREDENTIALS_SECRET
from keel.config import PipelineConfigBase, load_pipeline_config
from pipelines import RETRIES, configure_step
from pipelines.medical_diagnosis import pipeline as medical_diagnosis
from pipelines.model_performance import pipeline as model_performance

NAME = "retrain-when-degraded"
DEFAULT_MODEL = "models:/medical-diagnosis@champion"


def build(config_override: Path | None = None, retries: int = RETRIES) -> Any:
    """``config_override`` merges over the training config (medical_diagnosis's); the check's own config
    (tolerance, fewest rows) is the ``check_config`` parameter, model_performance's by default."""
    training = medical_diagnosis.build(config_override, retries)
    training_config = load_pipeline_config(medical_diagnosis.CONFIG_FILE, config_override)

    @dsl.pipeline(name=NAME, description="Check the medical-diagnosis champion on labeled rows; when it is "
                                         "degraded, run the medical_diagnosis pipeline to train, gate and register "
                                         "a successor.")
    def retrain_when_degraded(labels_source: str, model_uri: str = DEFAULT_MODEL,
                              source: str = medical_diagnosis.DEFAULT_SOURCE, run_name: str = "",
                              retrain: bool = True, serve: bool = False, serve_port: int = 8000, gpus: int = 0,
                              config_map: str = CONFIG_MAP, credentials_secret: str = CREDENTIALS_SECRET,
                              check_config: str = default_check_config(),
                              config: str = training.component_spec.inputs["config"].default) -> str:
        with when_degraded(model_uri, labels_source, check_config, config, run_name, retrain, config_map,
                           credentials_secret, retries, training_config) as checked:
            training(source=source, run_name=run_name, serve=serve, serve_port=serve_port, gpus=gpus,
                     config_map=config_map, credentials_secret=credentials_secret, config=config)
        return checked.outputs["performance_uri"]

    return retrain_when_degraded


def build_retraining(training: Any, training_config: PipelineConfigBase, name: str, description: str,
                     default_model: str, default_source: str, retries: int) -> Any:
    """A retraining DAG around a training pipeline whose parameters are the usual ones (``source``,
    ``run_name``, ``serve``, ``serve_port``, the cluster's config map and secret, ``config``): the
    recommender's and the text classifier's. medical_diagnosis also takes ``gpus``, so it has its own."""

    @dsl.pipeline(name=name, description=description)
    def retraining(labels_source: str, model_uri: str = default_model, source: str = default_source,
                   run_name: str = "", retrain: bool = True, serve: bool = False, serve_port: int = 8000,
                   config_map: str = CONFIG_MAP, credentials_secret: str = CREDENTIALS_SECRET,
                   check_config: str = default_check_config(),
                   config: str = training.component_spec.inputs["config"].default) -> str:
        with when_degraded(model_uri, labels_source, check_config, config, run_name, retrain, config_map,
                           credentials_secret, retries, training_config) as checked:
            training(source=source, run_name=run_name, serve=serve, serve_port=serve_port, config_map=config_map,
                     credentials_secret=credentials_secret, config=config)
        return checked.outputs["performance_uri"]

    return retraining


def default_check_config() -> str:
    """model_performance's config (tolerance, fewest rows), the ``check_config`` parameter's default."""
    return load_pipeline_config(model_performance.CONFIG_FILE).to_json()


@contextmanager
def when_degraded(model_uri: Any, labels_source: Any, check_config: Any, config: Any, run_name: Any, retrain: Any,
                  config_map: Any, credentials_secret: Any, retries: int,
                  training_config: PipelineConfigBase) -> Iterator[Any]:
    """The check at the root, then the block under ``retrain`` and the check's ``degraded`` output: what every
    retraining DAG shares (yields the check's task; the arguments are the pipeline's parameters, ``config`` the
    training config, which the check holds to the checked model's name; the check's pod gets its resources from
    ``training_config``, the one a user's ``--config`` merges over)."""
    checked = configure_step(
        check_performance(model_uri=model_uri, source=labels_source, config=check_config, run_name=run_name,
                          job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, training_config=config),
        config_map, credentials_secret, retries, training_config)
    # retrain=false only checks. The outer condition on a parameter also lets kfp.local resolve the inner
    # one: 2.17 reads a condition on a named task output in the root DAG as a missing pipeline input.
    with dsl.If(retrain == True, name="retraining-allowed"):  # noqa: E712 - KFP compares with ==
        with dsl.If(checked.outputs["degraded"] == True, name="degraded"):  # noqa: E712
            yield checked
