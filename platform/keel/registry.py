"""Register: log the model to MLflow as a pyfunc and move the registry aliases.

Every registered version gets the ``challenger`` alias; ``champion`` moves to
it only when the evaluation's promotion gate passed (see :mod:`keel.gate`). A failure after the version was created deletes the
version again, so a failed run never leaves a model version behind.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.data.pandas_dataset import from_pandas
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import AnyType

from keel import storage, tracking
from keel.config import RegisterConfig
from keel.data.ingest import DATA_FILE
from keel.errors import RegistryError
from keel.evaluate import EVALUATION_FILE, HEADLINE_METRICS
from keel.predictor import Predictor
from keel.runs import promotion_lines, registered_as
from keel.settings import KeelSettings

CHAMPION, CHALLENGER, AWAITING_APPROVAL = tracking.CHAMPION, tracking.CHALLENGER, tracking.AWAITING_APPROVAL
REJECTED, DEPLOY_FAILED = tracking.REJECTED, tracking.DEPLOY_FAILED
# Version tags a person's decision leaves (promote_by_hand, reject_by_hand): who, when, and from which champion
PROMOTED_BY_HAND, PROMOTED_BY, PROMOTED_AT = "keel.promoted_by_hand", "keel.promoted_by", "keel.promoted_at"
PREVIOUS_CHAMPION, REJECTED_BY, REJECTED_AT = "keel.previous_champion", "keel.rejected_by", "keel.rejected_at"
# ... and what `keel models show` lists of them (keel.lineage), with the check on labels (keel evaluate)
DECISION_TAGS = (PROMOTED_BY_HAND, PROMOTED_BY, PROMOTED_AT, PREVIOUS_CHAMPION, REJECTED, REJECTED_BY, REJECTED_AT,
                 AWAITING_APPROVAL, DEPLOY_FAILED, tracking.PERFORMANCE)
INPUT_EXAMPLE_ROWS = 5
SCHEMA_SAMPLE_ROWS = 1000
MAX_DESCRIPTION_CHARS = 5000  # MLflow's SQL registry column
# What every logged model's loader imports beyond the Python standard library, pinned to this environment's
# versions in its requirements (keel itself travels as the model's code: see model_code_paths).
MODEL_DISTRIBUTIONS = ("mlflow", "torch", "pandas", "numpy", "pydantic", "pydantic-settings")


class KeelPyfunc(PythonModel):
    """MLflow pyfunc flavour: raw input columns in, labels and class probabilities out."""

    MODEL_ARTIFACT = "model"

    def load_context(self, context: Any) -> None:
        self.predictor = Predictor.load(Path(context.artifacts[self.MODEL_ARTIFACT]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return self.predictor.predict(pd.DataFrame(model_input))


def _log_dataset(dataset_uri: str, target: str, settings: KeelSettings) -> None:
    manifest = storage.read_manifest(dataset_uri, settings)
    frame = storage.read_parquet(storage.join(dataset_uri, DATA_FILE), settings)
    # The source MLflow records is the ingested copy: exactly the bytes trained on, at a URI
    # MLflow can resolve. Where they came from is the ``dataset.source`` param.
    copy_uri = storage.join(dataset_uri, DATA_FILE)
    log_training_input(table_dataset(frame, copy_uri, storage.filename(manifest["source"]), manifest["sha256"][:16],
                                     target), copy_uri)
    mlflow.log_params({"dataset.source": manifest["source"], "dataset.sha256": manifest["sha256"],
                       "dataset.rows": manifest["rows"]})


def log_training_split(train: pd.DataFrame, splits: dict[str, Any], target: str | None = None) -> None:
    """A pipeline's train split as its run's training dataset (MLflow's Datasets tab, ``keel models show``),
    named after the source it came from, with that source and the row count as ``dataset.*`` params.
    ``splits`` is the manifest of the step that published the splits."""
    log_training_input(table_dataset(train, splits["splits"]["train"], storage.filename(splits["source"]),
                                     target=target), splits["splits"]["train"])
    mlflow.log_params({"dataset.source": splits["source"], "dataset.rows": splits["rows"]})


def table_dataset(frame: pd.DataFrame, source: str, name: str, digest: str | None = None,
                  target: str | None = None) -> Any:
    """``frame`` as an MLflow dataset, at ``source`` where MLflow can resolve it (a path, ``s3://``,
    ``http(s)://``; a ``builtin://`` table is named but has no source MLflow could open), with the schema
    :func:`dataset_schema` infers (a cached property: set, MLflow's own row-by-row pass never runs)."""
    from mlflow.exceptions import MlflowException

    with warnings.catch_warnings():  # MLflow registers its local-file source twice, then warns it is ambiguous
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        try:
            dataset = from_pandas(frame, source=source, targets=target, name=name, digest=digest)
        except MlflowException:
            dataset = from_pandas(frame, targets=target, name=name, digest=digest)
    dataset.schema = dataset_schema(frame)
    return dataset


def dataset_schema(frame: pd.DataFrame) -> Schema:
    """The schema MLflow infers for a dataset, without its Python pass over every value.

    MLflow tests each cell for null one at a time to mark columns required: 15 s of the register step for
    a million rows of 31 columns (31 s profiled), growing with the table. Each column's type comes from its
    first non-null values (ingest read every column as one type); ``required`` from pandas' null check.
    """
    return Schema([_column_spec(frame[name]) for name in frame.columns])


def _column_spec(column: pd.Series) -> ColSpec:
    present = column.dropna()
    sample = (present if len(present) else column).head(SCHEMA_SAMPLE_ROWS)  # all null: MLflow's verdict on nulls
    with warnings.catch_warnings():  # that integer columns cannot take nulls: a model input's concern, not a record's
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
        inferred = mlflow.models.infer_signature(sample.to_frame(column.name)).inputs.inputs[0]
    return ColSpec(inferred.type, column.name, required=len(present) == len(column))


def log_training_input(dataset: Any, uri: str, attempts: int = 3) -> None:
    """Link ``dataset`` to the active run, tagged with ``uri``, the run's own copy (see
    :data:`tracking.DATASET_URI_TAG`). MLflow creates a dataset row get-or-create style, not atomically: two
    runs logging the same data at once can collide on its unique key. The loser retries and links the winner's
    row."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import IntegrityError

    for attempt in range(attempts):
        try:
            mlflow.log_input(dataset, context="training", tags={tracking.DATASET_URI_TAG: uri})
            return
        except (IntegrityError, MlflowException) as e:  # MLflow sometimes wraps the IntegrityError
            if "UNIQUE constraint failed" not in str(e) or attempt == attempts - 1:
                raise


def accepting_input_schema(columns: list[str]) -> Schema:
    """Every input column required, of MLflow's ``any`` type: the model's own transform checks and converts the
    values (a DataError names the column), as `keel predict` and serving do.

    Types inferred from a few example rows refused frames the model scores: MLflow will not cast int64 to a
    ``double`` column (a CSV whose column has no gap this time) nor float64 to ``long`` (one with a gap), nor
    take pandas' nullable Int64 and boolean. ``mlflow.pyfunc.load_model(...).predict`` failed on the very table
    the model was trained on."""
    return Schema([ColSpec(AnyType(), name, required=True) for name in columns])


def model_code_paths() -> list[str]:
    """The keel package, copied into each logged model: a model then loads wherever MLflow does (`mlflow models
    serve`, `build-docker`, KServe's MLServer) with no keel installed. Its requirements named `keel` instead,
    which is no package of ours on PyPI but somebody else's: those tools installed it, and the model still did not
    load. Where keel is already imported (its own serving and scoring), the installed keel is the one used."""
    return [str(Path(__file__).parent)]


def model_requirements(*distributions: str) -> list[str]:
    """The model's pip requirements: MODEL_DISTRIBUTIONS and ``distributions`` at the versions this
    environment has, less a local build label (torch's ``+cpu``), which no public index serves."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+', 1)[0]}" for name in (*MODEL_DISTRIBUTIONS, *distributions)]


def _log_model(model_dir: Path, raw_test: pd.DataFrame, target: str) -> str:
    predictor = Predictor.load(model_dir)
    held_out = raw_test.drop(columns=[target])
    predictor.write_prediction_reference(model_dir, held_out)  # packaged with the model
    example = held_out.head(INPUT_EXAMPLE_ROWS)
    signature = ModelSignature(inputs=accepting_input_schema(list(example.columns)),
                               outputs=mlflow.models.infer_signature(example, predictor.predict(example)).outputs)
    info = mlflow.pyfunc.log_model(
        name="model", python_model=str(Path(__file__).with_name("mlflow_model.py")), artifacts={KeelPyfunc.MODEL_ARTIFACT: str(model_dir)},
        signature=signature, input_example=example, code_paths=model_code_paths(),
        pip_requirements=model_requirements(),
    )
    return str(info.model_uri)


def create_version(client: Any, name: str, model_uri: str, run_id: str, tags: dict[str, str]) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    version = client.create_model_version(name, model_uri, run_id=run_id, tags=tags)
    link_logged_model(client, model_uri, name, str(version.version))
    return version


def link_logged_model(client: Any, model_uri: str, name: str, version: str, linked: bool = True) -> None:
    """Record the version on its logged model (the ``mlflow.modelVersions`` tag ``mlflow.register_model`` sets),
    or take it off again. A SQL registry does not keep ``model_id`` on the version, so this tag is what MLflow's
    UI follows from a logged model, with its metrics and datasets, to the versions made from it."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    model_id = tracking.logged_model_id(model_uri)
    if model_id is None:
        return
    listed = [entry for entry in json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
              if (entry.get("name"), str(entry.get("version"))) != (name, version)]
    if linked:
        listed.append({"name": name, "version": version})
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(listed)})


def set_alias(client: Any, name: str, alias: str, version: str, attempts: int = 5) -> None:
    """Point ``alias`` at ``version``. MLflow's SQL store inserts a new alias row get-or-create style, so
    two registrations moving the same alias at once can collide on its unique key; the loser retries
    and then updates the row the winner created. Either way the alias ends on one version, whole."""
    import time

    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import IntegrityError

    for attempt in range(attempts):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except (IntegrityError, MlflowException) as e:
            if "UNIQUE constraint failed" not in str(e) or attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def promote(client: Any, config: RegisterConfig, version: str, gate: dict[str, Any]) -> dict[str, Any]:
    """Set ``challenger``; move ``champion`` only when the evaluation's gate passed against the
    version that is still champion now (another run may have promoted one meanwhile), and only by itself
    under ``approval: gate``: under ``manual`` a passing version is tagged as awaiting a person's approval."""
    set_alias(client, config.model_name, CHALLENGER, version)
    evaluated_against, current = gate["champion_version"], tracking.champion_version(client, config.model_name)
    checks: list[str] = []
    if evaluated_against != current:
        promoted = False
        reason = (f"not promoted: the champion changed to v{current} after this model was evaluated against "
                  f"v{evaluated_against}; run the pipeline again to compare with it")
    else:
        promoted, checks = bool(gate["passed"]), list(gate["failures"] or gate["reasons"])
        reason = ("gate passed: " if promoted else "gate failed: ") + "; ".join(checks)
    awaiting = promoted and config.approval == "manual"
    if awaiting:
        promoted = False
        reason = (f"awaiting approval (approval: manual): {reason}. `keel models promote {config.model_name} "
                  f"{version} --reason ...` makes it champion")
        client.set_model_version_tag(config.model_name, version, AWAITING_APPROVAL, "true")
    if promoted:
        set_alias(client, config.model_name, CHAMPION, version)
        client.set_model_version_tag(config.model_name, version, PREVIOUS_CHAMPION, current or "none")
    # checks: the gate's lines the reason quotes, for a summary that shows one per line
    return {"promoted": promoted, "awaiting_approval": awaiting, "previous_champion": current, "reason": reason,
            "checks": checks}


def version_description(pipeline: str, pipeline_run_id: str, decision: dict[str, Any]) -> str:
    """What MLflow's registry page shows of a version (Markdown): the run that made it and the gate's word, a
    check a line, so that a person approving or comparing versions there need not look for the run first."""
    head, *rest = promotion_lines(decision["reason"], decision["checks"])
    checks, after = rest[:len(decision["checks"])], rest[len(decision["checks"]):]
    lines = [f"Registered by Keel's `{pipeline}` pipeline, run `{pipeline_run_id}`.", "",
             f"{head}:" if checks else head, *(f"- {check}" for check in checks), *(["", *after] if after else [])]
    return "\n".join(lines)[:MAX_DESCRIPTION_CHARS]


@dataclass
class Registration:
    """One register step in progress: its MLflow run, private output and scratch, and the version it made."""

    client: Any
    run_id: str
    pipeline_run_id: str
    out: storage.StagedOutput
    scratch: Path
    tracking_uri: str
    experiment_id: str
    pipeline: str
    version: str | None = None
    previous_aliases: dict[str, str] = field(default_factory=dict)

    def publish(self, config: RegisterConfig, logged_uri: str, gate: dict[str, Any]) -> dict[str, Any]:
        """Create the version from the logged model, apply the gate's decision, record it; returns the manifest."""
        self.previous_aliases = aliases(self.client, config.model_name)
        self.version = str(create_version(self.client, config.model_name, logged_uri, self.run_id,
                                          {tracking.PIPELINE_RUN_TAG: self.pipeline_run_id}).version)
        decision = promote(self.client, config, self.version, gate)
        self.client.update_model_version(config.model_name, self.version, description=version_description(
            self.pipeline, self.pipeline_run_id, decision))
        mlflow.set_tags({tracking.PROMOTED_TAG: str(decision["promoted"]).lower(),
                         tracking.GATE_TAG: "passed" if gate["passed"] else "failed",
                         tracking.PROMOTION_REASON_TAG: decision["reason"][:tracking.MAX_TAG_CHARS],
                         tracking.PROMOTION_CHECKS_TAG: json.dumps(decision["checks"])[:tracking.MAX_TAG_CHARS]})
        self.out.manifest.update(model_name=config.model_name, version=self.version,
                                 model_uri=f"models:/{config.model_name}/{self.version}", mlflow_run_id=self.run_id,
                                 mlflow_experiment_id=self.experiment_id,
                                 tracking_uri=self.tracking_uri, **decision,
                                 summary=f"version {self.version}{registered_as(decision)}")
        return self.out.manifest


@contextmanager
def registration(config: RegisterConfig, pipeline_run_id: str, pipeline: str, output_uri: str,
                 settings: KeelSettings) -> Iterator[Registration]:
    """The pipeline's MLflow run (FAILED if the block raises) and a private output; a version created inside
    a block that then fails is withdrawn, so a failed run never leaves a model version behind."""
    client = tracking.mlflow_client(settings)
    run_id = tracking.pipeline_run(settings, pipeline_run_id, pipeline)
    current: Registration | None = None
    try:
        # Leaving the MLflow block on an exception ends the run as FAILED.
        with storage.staged_output(output_uri, "register", settings) as out, \
                tempfile.TemporaryDirectory(prefix="keel-register-") as scratch, mlflow.start_run(run_id=run_id) as active:
            current = Registration(client, run_id, pipeline_run_id, out, Path(scratch), settings.mlflow_tracking_uri,
                                   active.info.experiment_id, pipeline)
            yield current
    except BaseException:
        if current is not None and current.version is not None:
            withdraw(client, config.model_name, current.version, current.previous_aliases)
        raise


def register(model_uri: str, evaluation_uri: str, dataset_uri: str, splits_uri: str, config: RegisterConfig,
             params: dict[str, Any], pipeline_run_id: str, pipeline: str, output_uri: str,
             settings: KeelSettings) -> dict[str, Any]:
    """Log params, metrics, dataset and pyfunc model to the pipeline's MLflow run, then register it."""
    with registration(config, pipeline_run_id, pipeline, output_uri, settings) as step:
        evaluation = read_evaluation(evaluation_uri, EVALUATION_FILE, settings)
        metrics = {name: float(evaluation[name]) for name in HEADLINE_METRICS}
        model_dir = storage.download_directory(model_uri, step.scratch / "model", settings)
        target = Predictor.load(model_dir).transform.target
        mlflow.log_params(flatten_params(params))
        mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items() if v == v})  # NaN != NaN
        _log_dataset(dataset_uri, target, settings)
        raw_test = storage.read_parquet(storage.read_manifest(splits_uri, settings)["raw_test"], settings)
        return step.publish(config, _log_model(model_dir, raw_test, target), evaluation["gate"])


def read_evaluation(evaluation_uri: str, file: str, settings: KeelSettings) -> dict[str, Any]:
    """The evaluate stage's report (logged to the active MLflow run); it must carry a gate decision."""
    evaluation: dict[str, Any] = storage.read_json(storage.join(evaluation_uri, file), settings)
    if "gate" not in evaluation:
        raise RegistryError(f"{evaluation_uri}: the evaluation holds no gate decision; evaluate the model with "
                            "this Keel version first.")
    mlflow.log_dict(evaluation, file)
    return evaluation


def flatten_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config sections as dotted MLflow params (``train.learning_rate``)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list) else str(value)
    return flat


def aliases(client: Any, name: str) -> dict[str, str]:
    """The model's aliases now ({} when the model does not exist yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return {alias: str(v) for alias, v in (client.get_registered_model(name).aliases or {}).items()}
    except MlflowException:
        return {}


def withdraw(client: Any, name: str, version: str, previous_aliases: dict[str, str]) -> None:
    """Undo a half-finished registration: delete the version and its link, point the aliases back."""
    link_logged_model(client, client.get_model_version(name, version).source, name, version, linked=False)
    client.delete_model_version(name, version)
    for alias, previous in previous_aliases.items():
        set_alias(client, name, alias, previous)


def promote_by_hand(name: str, version: str, reason: str, settings: KeelSettings) -> dict[str, Any]:
    """Point ``champion`` at ``version`` without a gate: a rollback, or a person overriding the gate's verdict.

    The version gets tags saying who moved it, when, from which champion and why, so the registry keeps
    the audit trail a pipeline's promotion leaves in its run. ``inputs_change`` and ``classes_change`` say how the
    columns it reads and the classes it predicts differ from the previous champion's: the served API changes with
    them."""
    client = tracking.mlflow_client(settings)
    target = _version_for_a_person(client, name, version, reason, "a promotion by hand", settings)
    if target.status != "READY":
        raise RegistryError(f"models:/{name}/{version} is {target.status}, not READY: it cannot serve.")
    previous = tracking.champion_version(client, name)
    set_alias(client, name, CHAMPION, str(target.version))
    _record_decision(client, target, {PROMOTED_BY_HAND: reason.strip()[:tracking.MAX_TAG_CHARS], PROMOTED_BY: _user(),
                                      PROMOTED_AT: _now(), PREVIOUS_CHAMPION: previous or "none"})
    before = tracking.served_schema(f"models:/{name}/{previous}") if previous else (None, None)
    after = tracking.served_schema(f"models:/{name}/{target.version}")
    return {"model_name": name, "version": str(target.version), "previous_champion": previous,
            "changed": previous != str(target.version), "reason": reason.strip(),
            "inputs_change": tracking.column_changes(before[0], after[0]),
            "classes_change": tracking.column_changes(before[1], after[1])}


def champion_back_after_failed_deploy(name: str, version: str, why: str, settings: KeelSettings,
                                      move_back: bool = True) -> str | None:
    """Point ``champion`` back at the version it replaced, when the deploy step could not serve ``version``.

    The champion is the version that serves: left on a version the deploy step failed to serve, it named a
    model nobody was answering with, and the next `keel serve models:/NAME@champion` would start what had just
    failed. ``version`` stays challenger, tagged ``keel.deploy_failed`` with ``why``. Returns the version champion
    is back at; None when there was none before it, or when nothing served the model (``move_back`` false: the
    champion before it serves no more than it does), or when champion has moved on from ``version`` meanwhile (a
    person's or another run's promotion stands). The tag is set in the first two cases too.
    """
    client = tracking.mlflow_client(settings)
    if tracking.champion_version(client, name) != version:
        return None
    client.set_model_version_tag(name, version, DEPLOY_FAILED, why.strip()[:tracking.MAX_TAG_CHARS])
    previous = client.get_model_version(name, version).tags.get(PREVIOUS_CHAMPION, "none")
    if previous == "none" or not move_back:
        return None
    set_alias(client, name, CHAMPION, previous)
    return previous


def reject_by_hand(name: str, version: str, reason: str, settings: KeelSettings) -> dict[str, Any]:
    """A person turns a version down (one awaiting approval, say): tagged ``keel.rejected`` with who, when and
    why, no longer awaiting approval. The champion cannot be rejected: promote another version instead."""
    client = tracking.mlflow_client(settings)
    target = _version_for_a_person(client, name, version, reason, "a rejection", settings)
    if tracking.champion_version(client, name) == str(target.version):
        raise RegistryError(f"models:/{name}/{target.version} is the champion: to stop serving it, promote "
                            f"another version (`keel models promote {name} N --reason ...`).")
    awaiting = target.tags.get(AWAITING_APPROVAL) == "true"
    _record_decision(client, target, {REJECTED: reason.strip()[:tracking.MAX_TAG_CHARS], REJECTED_BY: _user(),
                                      REJECTED_AT: _now()})
    return {"model_name": name, "version": str(target.version), "was_awaiting_approval": awaiting,
            "reason": reason.strip()}


def _version_for_a_person(client: Any, name: str, version: str, reason: str, decision: str,
                          settings: KeelSettings) -> Any:
    """The model version a person decides on, which must exist; the decision needs a reason, kept on it."""
    if not reason.strip():
        raise RegistryError(f"{decision} needs a reason (--reason), kept on the model version.")
    return registered_version(client, name, version, settings)


def registered_version(client: Any, name: str, version: str, settings: KeelSettings) -> Any:
    """A version by number or alias (``champion``); a RegistryError lists the versions there are."""
    from mlflow.exceptions import MlflowException

    try:
        if version.isdecimal():
            return client.get_model_version(name, version)
        return client.get_model_version_by_alias(name, version)
    except MlflowException as e:
        ref = f"models:/{name}/{version}" if version.isdecimal() else f"models:/{name}@{version}"
        known = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        raise RegistryError(f"{ref}: not in the registry at {settings.mlflow_tracking_uri} "
                            f"({'versions: ' + ', '.join(map(str, known)) if known else 'no such model'})."
                            + tracking.empty_local_registry_hint(client, settings)) from e


def _record_decision(client: Any, target: Any, record: dict[str, str]) -> None:
    """Tag the version with a person's decision; it no longer awaits one, and a promotion overrides an earlier
    rejection (the record says what was decided last)."""
    for key, value in record.items():
        client.set_model_version_tag(target.name, str(target.version), key, value)
    for stale in (AWAITING_APPROVAL, REJECTED):
        if stale not in record and target.tags.get(stale):
            client.delete_model_version_tag(target.name, str(target.version), stale)


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a name (an arbitrary uid)
        return "unknown"


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")
