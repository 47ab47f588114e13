"""A registered model on rows whose labels came in after it served them, judged against its own registration.

Drift (``keel_feature_drift_psi``) says the inputs moved; only labels say whether the answers are still
right, and labels come late (a biopsy result, a chargeback, a returned parcel). :func:`check_performance`
scores a labeled table with a registered version through the serving path and judges it by the rules that
promoted it: the promotion metric within ``tolerance`` of the value it was registered on, no gated slice
worse than its registered slice by more than the slice tolerance, fairness gaps within their bounds. The
slices, positive class and bounds are the version's own, read back from its MLflow run (the pipeline config
it was trained with), and the comparison is with the evaluation it was registered on (``evaluation.json``
on that run), so a check needs no config of its own beyond the tolerance.

The verdict goes where people look: a new MLflow run whose metrics are linked to the version's logged model
and to the labeled table as a dataset, a ``keel.performance`` tag on the version, the output directory
(``performance.json``, plots, ``report.html``) and, with ``KEEL_PUSHGATEWAY_URL``, Prometheus gauges that
the ``KeelModelDegraded`` alert reads.

A recommender's labels are the interactions that came in after it was registered: :mod:`keel.monitor.ranking`
judges its NDCG@k on them the same way, and the verdict goes to the same places.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from keel import storage, tracking
from keel.batch.scorers import TEXT_COLUMN, TEXTS_PER_FORWARD
from keel.config import EvaluateConfig, GateConfig, PipelineConfigBase, parse_pipeline_config
from keel.errors import ConfigError, DataError, RegistryError, validation_problems
from keel.evaluate import HEADLINE_METRICS, REPORT_HTML, full_report, report_html, write_plots
from keel.gate import decide
from keel.monitor.ranking import ranking_report
from keel.monitor.verdict import (PERFORMANCE_FILE, PERFORMANCE_TAG, labeled_dataset, log_check,
                                  performance_manifest, push_verdict, summary_tag)
from keel.settings import KeelSettings

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient

    from keel.serve.deployment import LoadedModel

Section = TypeVar("Section", bound=BaseModel)
REGISTERED_EVALUATION = "evaluation.json"  # what the register step logs on the version's run
INTENT_COLUMN = "intent"  # a text classifier's labels, as in the customer_service_intents training file


class PerformanceConfig(BaseModel):
    """How strictly live rows are judged: by ``keel evaluate``'s options, or the model_performance pipeline's
    ``performance`` section."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tolerance: float = Field(default=0.05, ge=0, le=1, description="the promotion metric may be this much worse "
                                                                   "than the value the version was registered on")
    min_rows: int = Field(default=50, ge=1, description="the fewest labeled rows a verdict is given on: over "
                                                        "fewer, a metric is mostly sampling noise")
    label_column: str | None = Field(default=None, min_length=1, description="the file's label column, when not "
                                     "the model's own (its target; a text classifier's intent)")
    input_column: str | None = Field(default=None, min_length=1, description="a text classifier: the file's text "
                                     "column, when not text")


class PerformanceCheckConfig(PipelineConfigBase):
    """The ``model_performance`` pipeline's config: one section (what is checked comes from the registry)."""

    performance: PerformanceConfig = PerformanceConfig()


@dataclass(frozen=True)
class Registration:
    """What a version was registered on: its promotion metric, its evaluation config, its evaluation."""

    name: str
    version: str
    run_id: str
    experiment_id: str
    model_id: str | None
    metric: str
    greater_is_better: bool
    evaluate: EvaluateConfig
    evaluation: dict[str, Any]
    params: dict[str, str] = field(default_factory=dict)  # the pipeline config it was trained with, dotted


def check_performance(model_uri: str, source: str, output_uri: str, settings: KeelSettings,
                      config: PerformanceConfig = PerformanceConfig()) -> dict[str, Any]:
    """Score the labeled rows of ``source`` with ``model_uri`` and judge them against its registration.

    Args:
        model_uri: ``models:/NAME@ALIAS`` or ``models:/NAME/N`` of a classifier (tabular or text) or a
            recommender; resolved once.
        source: a CSV, Parquet or JSONL table (path, ``s3://``, ``http(s)://``) with the model's input
            columns and its label column (a text classifier's: ``text`` and ``intent``); rows whose label is
            still empty are counted and left out. A recommender's: interactions in its training file's columns.
        output_uri: a directory (path or ``s3://``) for ``performance.json``, plots and ``report.html``.

    Returns:
        The published manifest: verdict, live and registered metrics, rows, the MLflow run.
    """
    from keel.serve.deployment import load_registered

    loaded = load_registered(model_uri, settings)
    if loaded.recommender is None:
        label_column(loaded)
    elif config.label_column or config.input_column:
        raise ConfigError(f"models:/{loaded.name}/{loaded.version} is a recommender: it reads the columns its "
                          "training file had (interactions.columns); label_column and input_column are for "
                          "classifiers.")
    registration = registered_evaluation(tracking.mlflow_client(settings), loaded.name, loaded.version,
                                         tabular=loaded.predictor is not None)
    with storage.staged_output(output_uri, "check", settings) as out, \
            tempfile.TemporaryDirectory(prefix="keel-performance-") as scratch:
        from keel.data.ingest import read_source, sha256_file

        frame, local, _ = read_source(source, Path(scratch), settings)
        if loaded.recommender is not None:
            report = ranking_report(loaded.recommender, registration, frame, source, config)
        else:
            report = judged_report(loaded, registration, frame, source, config)
            write_plots(report, out.dir)
        out.write_json(PERFORMANCE_FILE, report)
        out.path(REPORT_HTML).write_text(report_html(
            report, out.dir, f"{loaded.name} v{loaded.version} on {report['measured_on']}: "
                             f"{report['verdict'].upper()}"))
        sha256 = sha256_file(local)
        dataset = labeled_dataset(frame, source, sha256, report.get("label_column"))
        report["mlflow_run_id"] = log_check(report, out.dir, registration, dataset, source, settings)
        out.manifest.update(performance_manifest(report, model_uri, source), sha256=sha256,
                            performance=out.uri_of(PERFORMANCE_FILE), report_html=out.uri_of(REPORT_HTML))
    # once the output is published: the tag is what `keel models list` shows as the latest check
    tracking.mlflow_client(settings).set_model_version_tag(loaded.name, loaded.version, PERFORMANCE_TAG,
                                                           summary_tag(report, source))
    if settings.pushgateway_url:
        push_verdict(settings.pushgateway_url, out.manifest)
    return out.manifest


def check_with_config(model_uri: str, source: str, output_uri: str, config: Any,
                      settings: KeelSettings, training_config: str = "") -> dict[str, Any]:
    """The model_performance pipeline's step: :func:`check_performance` with the config's ``performance``.
    In a retraining pipeline, ``training_config`` is the JSON config a degraded verdict trains with."""
    if not isinstance(config, PerformanceCheckConfig):
        raise ConfigError(f"the performance check reads a model_performance config, not {config.pipeline!r}'s.")
    if training_config:
        refuse_to_retrain_another_model(model_uri, training_config)
    return check_performance(model_uri, source, output_uri, settings, config.performance)


def refuse_to_retrain_another_model(model_uri: str, training_config: str) -> None:
    """Checking one model and retraining another: with `--config` left out, a check of one's own model
    retrained the bundled table's model (its contract refused the user's table at the validate step, after the
    check, and told them to fix data that was right); with `model_uri` left out, the bundled model was checked."""
    checked = tracking.registered_name(model_uri)
    registry = getattr(parse_pipeline_config(training_config, "the config parameter"), "registry", None)
    retrained = registry.model_name if registry is not None else None
    if checked and retrained and checked != retrained:
        raise ConfigError(f"model_uri {model_uri} is model {checked!r}, but a degraded verdict would train and "
                          f"register {retrained!r} (the training config's registry.model_name). Pass the config "
                          f"{checked!r} was trained with (keel run --config FILE; the config parameter on "
                          f"Kubeflow), or a model_uri of {retrained!r}.")


def judged_report(loaded: LoadedModel, registration: Registration, frame: pd.DataFrame, source: str,
                  config: PerformanceConfig) -> dict[str, Any]:
    """The evaluate stage's report on the labeled rows, with the verdict against the registration."""
    target = label_column(loaded)
    frame, renamed = columns_as_trained(frame, loaded, config, source)
    labeled, unlabeled = labeled_rows(frame, target, source, config.min_rows)
    try:
        classes, labels, probabilities = scored_rows(loaded, labeled)
    except DataError as e:
        read_as = "".join(f" (the file's {theirs!r} read as {ours!r})" for theirs, ours in renamed.items())
        raise DataError(f"{source}: {e}{read_as}") from e
    report = full_report(labeled, labels, probabilities, classes, registration.evaluate)
    gate = registration.evaluate.gate
    rules = GateConfig(tolerance=config.tolerance, slice_tolerance=gate.slice_tolerance,
                       max_demographic_parity_difference=gate.max_demographic_parity_difference,
                       max_equalized_odds_difference=gate.max_equalized_odds_difference)
    decision = decide(report, registration.evaluation, registration.version, registration.metric,
                      registration.greater_is_better, rules, baseline=f"registered v{registration.version}")
    report.update(gate=decision.to_dict(), verdict="ok" if decision.passed else "degraded",
                  model_name=loaded.name, version=loaded.version, metric=registration.metric,
                  label_column=config.label_column or target,  # the file's, as MLflow's dataset records it
                  unlabeled_rows=unlabeled, headline=list(HEADLINE_METRICS),
                  measured_on=f"{len(labeled)} labeled rows",
                  registered={name: registration.evaluation.get(name) for name in HEADLINE_METRICS})
    return report


def label_column(loaded: LoadedModel) -> str:
    """Where a labeled table holds the answer: a tabular model's target, a text classifier's ``intent``
    (the column its training file had); a recommender has no single right answer to check."""
    if loaded.predictor is not None:
        return loaded.predictor.transform.target
    if loaded.intents is not None:
        return INTENT_COLUMN
    raise ConfigError(f"models:/{loaded.name}/{loaded.version} is a {loaded.kind}: it is checked on later "
                      "interactions, which have no label column.")


def columns_as_trained(frame: pd.DataFrame, loaded: LoadedModel, config: PerformanceConfig,
                       source: str) -> tuple[pd.DataFrame, dict[str, str]]:
    """The file's label (and a text classifier's text) column under the names the model knows, for a file
    exported under its own names (a help desk's ``message`` and ``category``); returns what was renamed."""
    if config.input_column is not None and loaded.intents is None:
        raise ConfigError(f"models:/{loaded.name}/{loaded.version} reads its training columns by name; "
                          "input_column (--input-column) is for text classifiers.")
    wanted = {config.label_column: label_column(loaded), config.input_column: TEXT_COLUMN}
    renamed = {theirs: ours for theirs, ours in wanted.items() if theirs is not None and theirs != ours}
    header = list(map(str, frame.columns))
    for theirs, ours in renamed.items():
        if theirs not in header:
            raise DataError(f"{source}: no column {theirs!r} (named by --label-column or --input-column); the "
                            f"file has {header}.")
        if ours in header:
            raise DataError(f"{source}: has both {theirs!r} and {ours!r}; the model would read {ours!r}. Rename "
                            f"or drop one of them.")
    return frame.rename(columns=renamed), renamed


def scored_rows(loaded: LoadedModel, labeled: pd.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The model's classes, each row's true class index and the probabilities it gives each class, through the
    path serving takes (a text is scrubbed of personal data inside the model, as when it is served)."""
    if loaded.predictor is not None:
        predictor = loaded.predictor
        return (predictor.classes, predictor.transform.encode_labels(labeled[predictor.transform.target]),
                predictor.predict_proba(labeled))
    assert loaded.intents is not None
    model = loaded.intents
    if TEXT_COLUMN not in labeled.columns or labeled[TEXT_COLUMN].isna().any():
        raise DataError(f"column {TEXT_COLUMN!r}: a text classifier reads each row's text from it; it is "
                        + ("missing." if TEXT_COLUMN not in labeled.columns
                           else f"empty in {int(labeled[TEXT_COLUMN].isna().sum())} labeled row(s)."))
    index = {intent: i for i, intent in enumerate(model.labels)}
    intents = labeled[INTENT_COLUMN].astype(str)
    unknown = sorted(set(intents) - set(index))
    if unknown:
        raise DataError(f"column {INTENT_COLUMN!r}: intent(s) {unknown[:5]} are not among the model's "
                        f"{model.labels}.")
    texts = labeled[TEXT_COLUMN].astype(str).tolist()
    probabilities = np.concatenate([model.probabilities(texts[start:start + TEXTS_PER_FORWARD]).numpy()
                                    for start in range(0, len(texts), TEXTS_PER_FORWARD)])
    return model.labels, intents.map(index).to_numpy(dtype=np.int64), probabilities


def labeled_rows(frame: pd.DataFrame, target: str, source: str, min_rows: int) -> tuple[pd.DataFrame, int]:
    """The rows whose label has come in, and how many have not; too few for a verdict is an error."""
    if target not in frame.columns:
        raise DataError(f"{source}: no label column {target!r}. The model predicts {target!r}, so the labels "
                        f"to check it against go in that column (or name yours with --label-column); the file has "
                        f"{list(map(str, frame.columns))}.")
    missing = frame[target].isna() | (frame[target].astype(str).str.strip() == "")
    labeled = frame[~missing].reset_index(drop=True)
    if len(labeled) < min_rows:
        raise DataError(f"{source}: {len(labeled)} labeled row(s) ({int(missing.sum())} without a {target!r}); "
                        f"a verdict needs at least {min_rows} (--min-rows, performance.min_rows).")
    return labeled, int(missing.sum())


def registered_evaluation(client: MlflowClient, name: str, version: str, tabular: bool = True) -> Registration:
    """The version's promotion metric, evaluation config and evaluation, from its MLflow run.

    Each comes from what the register step logged: the pipeline config as dotted params, ``evaluation.json``
    as an artifact (or, for a version registered before it was, the ``test_*`` metrics, overall only). A text
    classifier's pipeline has no slices or fairness bounds (its ``evaluate`` section is another), so it is
    judged on its promotion metric alone.
    """
    model_version = client.get_model_version(name, version)
    if not model_version.run_id:
        raise RegistryError(f"models:/{name}/{version} has no MLflow run, so nothing records what it was "
                            "registered on; register it through a Keel pipeline.")
    run = client.get_run(model_version.run_id)
    params = run.data.params
    metric = params.get("registry.promotion_metric", "f1_macro")
    evaluation = _registered_report(client, run.info.run_id) or {
        key[len("test_"):]: value for key, value in run.data.metrics.items() if key.startswith("test_")}
    if metric not in evaluation:
        raise RegistryError(f"models:/{name}/{version}: its run {run.info.run_id} records no test {metric!r} "
                            f"(the registry.promotion_metric) to compare with.")
    evaluate = evaluate_config_from_params(params, f"models:/{name}/{version}") if tabular else EvaluateConfig()
    return Registration(name, version, run.info.run_id, run.info.experiment_id,
                        tracking.version_logged_model_id(model_version, run), metric, params.get("registry.greater_is_better", "True") == "True", evaluate, evaluation,
                        dict(params))


def evaluate_config_from_params(params: dict[str, str], origin: str) -> EvaluateConfig:
    """The ``evaluate`` section a tabular version was trained with (see :func:`section_from_params`)."""
    return section_from_params(params, "evaluate", EvaluateConfig, origin)


def section_from_params(params: dict[str, str], name: str, model: type[Section], origin: str) -> Section:
    """A config section a version was trained with, rebuilt from the dotted params
    (:func:`keel.registry.flatten_params`) its run holds; the defaults where the run has none."""
    section: dict[str, Any] = {}
    for key, text in params.items():
        if not key.startswith(f"{name}."):
            continue
        *parents, leaf = key.split(".")[1:]
        node = section
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = _param_value(text)
    try:
        return model.model_validate(section)
    except ValidationError as e:
        raise RegistryError(f"{origin}: its run's {name}.* params do not make a {name} section: "
                            f"{validation_problems(e, model)}") from e


def _param_value(text: str) -> Any:
    """A param as :func:`keel.registry.flatten_params` wrote it: JSON for lists, ``str()`` for the rest. A
    number stays text, which pydantic reads as a number where the field is one and as text where it is text
    (``evaluate.positive_class`` '1' of 0/1 labels was read as the integer 1, and refused)."""
    if text in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[text]
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, (list, dict)) else text


def _registered_report(client: MlflowClient, run_id: str) -> dict[str, Any] | None:
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="keel-registered-") as scratch:
        try:
            path = client.download_artifacts(run_id, REGISTERED_EVALUATION, scratch)
        except (MlflowException, OSError):
            return None
        report: dict[str, Any] = json.loads(Path(path).read_text())
    return report
