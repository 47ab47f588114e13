"""MLflow tracking: one MLflow run per pipeline run, shared by every stage.

Stages find the run by the ``keel.pipeline_run_id`` tag instead of passing an
MLflow run id along the DAG, so any stage can log to it, and a retried stage
logs to the same run rather than starting another.
"""

from __future__ import annotations

import functools
import subprocess
import time
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from keel import storage
from keel.errors import RegistryError, TrackingError
from keel.settings import KeelSettings, export_s3_environment, make_directory

if TYPE_CHECKING:
    from mlflow import MlflowClient

# what `mlflow ui` (and `make ui`) serves on by default
LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"
PIPELINE_RUN_TAG = "keel.pipeline_run_id"
PIPELINE_TAG = "keel.pipeline"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
CHAMPION = "champion"  # registry alias of the version serving traffic
CHALLENGER = "challenger"  # registry alias of the newest registered version
AWAITING_APPROVAL = "keel.awaiting_approval"  # version tag: passed the gate, waits for a person (approval: manual)
DEPLOY_FAILED = "keel.deploy_failed"  # version tag: promoted, but the deploy step could not serve it (why)
REJECTED = "keel.rejected"  # version tag: a person turned it down (`keel models reject`), with the reason
PERFORMANCE = "keel.performance"  # version tag: the latest check on labeled rows (`keel evaluate`), one line
GATE_TAG = "keel.gate"  # run tag: the evaluate step's gate, passed or failed
PROMOTED_TAG = "keel.promoted"  # run tag: whether the register step moved champion
PROMOTION_REASON_TAG = "keel.promotion_reason"  # run tag: why the register step did or did not
PROMOTION_CHECKS_TAG = "keel.promotion_checks"  # run tag: the gate checks that reason quotes, as a JSON list
COMPRESSION_CHOSEN_TAG = "keel.compression.chosen"  # run tag: the variant the compress stage registered
COMPRESSION_REASON_TAG = "keel.compression.reason"  # run tag: why that one, and why each other variant lost
# dataset input tag: the run's own copy of its data. MLflow keeps one dataset per name and digest in an
# experiment, with the source of the first run that logged it, so a later run on the same bytes shows that
# earlier run's copy (which may be deleted) as its source.
DATASET_URI_TAG = "keel.dataset_uri"

# Where Keel cuts a reason or a person's words kept in a tag (a run's or a version's): within every limit of
# MLflow's SQL store (a run tag 8,000 characters, a registered model's 5,000), and longer than any reason it writes.
MAX_TAG_CHARS = 5000
PROBABILITY_PREFIX = "probability_"  # a tabular model's output column for each class (keel.predictor writes them)


def tag_compression_choice(client: Any, run_id: str, chosen: str, reason: str) -> None:
    """The compress stage's pick on the pipeline's run, where `keel models show` finds it for the version."""
    client.set_tag(run_id, COMPRESSION_CHOSEN_TAG, chosen)
    client.set_tag(run_id, COMPRESSION_REASON_TAG, reason[:MAX_TAG_CHARS])


def every_page(search: Callable[..., Any], **arguments: Any) -> Iterator[Any]:
    """Every result of an MLflow ``search_*`` call: each returns one page (``search_registered_models``, 100
    models by default) and a token for the next."""
    token = None
    while True:
        page = search(page_token=token, **arguments)
        yield from page
        token = page.token
        if not token:
            return


def mlflow_client(settings: KeelSettings) -> MlflowClient:
    """A client for the configured tracking URI, with S3 credentials exported for artifacts."""
    import mlflow
    from mlflow import MlflowClient

    export_s3_environment(settings)
    check_tracking_server(settings.mlflow_tracking_uri)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    if settings.mlflow_tracking_uri.startswith("sqlite:///"):
        return _initialize_sqlite_once(settings.mlflow_tracking_uri)
    return MlflowClient(settings.mlflow_tracking_uri)


def is_tracking_server(tracking_uri: str) -> bool:
    """An MLflow server over HTTP, with its own UI; else a store this process opens itself (SQLite, a
    directory) or Databricks."""
    return tracking_uri.startswith(("http://", "https://"))


def check_tracking_server(tracking_uri: str, timeout_s: float = storage.ENDPOINT_CHECK_TIMEOUT_S) -> None:
    """Fail in seconds, naming the server, where MLflow's client retries a refused connection for minutes (7
    retries with backoff a call: a `keel run` against a stopped server took 8 minutes to end in a traceback).

    Only a server that does not answer at all fails here (:func:`keel.storage.no_answer`). A pipeline step that
    fails here is retried by its KFP retry policy, as any failed step is. A server that answered is not asked
    again by this process.
    """
    if is_tracking_server(tracking_uri):
        _server_answers(tracking_uri, timeout_s)


@functools.cache
def _server_answers(tracking_uri: str, timeout_s: float) -> None:
    """Returns once the server answers (cached); raises, uncached, when it does not."""
    reason = storage.no_answer(tracking_uri.rstrip("/") + "/health", timeout_s)
    if reason is not None:
        raise TrackingError(f"cannot reach the MLflow tracking server at {tracking_uri} ({reason}). Start it, or "
                            "point KEEL_MLFLOW_TRACKING_URI at one that answers (unset, Keel keeps runs and the "
                            "registry in SQLite under KEEL_HOME).")


def _initialize_sqlite_once(tracking_uri: str) -> MlflowClient:
    """Create or migrate the SQLite store under a file lock.

    MLflow migrates the schema on first connection; two processes doing that
    at once (two pipeline runs started together on a fresh machine) corrupt
    the migration, so the first connection is serialized.
    """
    import fcntl
    import logging

    from mlflow import MlflowClient

    database = Path(tracking_uri[len("sqlite:///"):])
    make_directory(database.parent)
    # "Creating initial MLflow database tables...", on stderr, amid a command's own output: Keel makes the store
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    with open(database.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = MlflowClient(tracking_uri)
            client.search_experiments(max_results=1)  # tracking store: created and migrated here
            client.search_registered_models(max_results=1)  # registry store, same database
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return client


def experiment_name(settings: KeelSettings, pipeline: str) -> str:
    """KEEL_EXPERIMENT_NAME, else the pipeline's name: MLflow compares runs within an experiment, and runs of
    different pipelines share no metrics worth comparing."""
    return settings.experiment_name or pipeline


def experiment_id(client: MlflowClient, settings: KeelSettings, pipeline: str) -> str:
    """The pipeline's experiment, created with its artifacts under Keel's artifact root."""
    from mlflow.exceptions import MlflowException

    name = experiment_name(settings, pipeline)
    existing = client.get_experiment_by_name(name)
    if existing is not None and existing.lifecycle_stage == "deleted":  # MLflow keeps its name: no run goes there
        raise TrackingError(
            f"MLflow experiment {name} (id {existing.experiment_id}) at {settings.mlflow_tracking_uri} is deleted: "
            f"restore it (`MLFLOW_TRACKING_URI={settings.mlflow_tracking_uri} mlflow experiments restore "
            f"--experiment-id {existing.experiment_id}`), or set KEEL_EXPERIMENT_NAME to log this pipeline's runs "
            "to another experiment.")
    if existing is not None:
        return str(existing.experiment_id)
    try:
        return str(client.create_experiment(name, artifact_location=storage.join(settings.artifact_root, "mlflow")))
    except MlflowException:  # created concurrently by another stage or run
        again = client.get_experiment_by_name(name)
        if again is None:
            raise
        return str(again.experiment_id)


def git_commit(settings: KeelSettings) -> str:
    """The commit to tag runs with: KEEL_GIT_COMMIT (an image's build sets it), else the HEAD of the working
    directory's repository, else that of the checkout Keel's code runs from (``keel run`` started outside it),
    else 'unknown'."""
    if settings.git_commit:
        return settings.git_commit
    return _git_head(Path.cwd()) or _git_head(Path(__file__).parent) or "unknown"


def _git_head(directory: Path) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else None


def registered_name(model_uri: str | None) -> str | None:
    """The registered model a ``models:/NAME/N`` or ``models:/NAME@alias`` URI names (None for other URIs)."""
    if not model_uri or not model_uri.startswith("models:/"):
        return None
    return model_uri[len("models:/"):].split("@", 1)[0].split("/", 1)[0] or None


def split_model_reference(reference: str) -> tuple[str, str, str]:
    """A ``models:/`` URI's path, ``NAME@ALIAS`` or ``NAME/N``, as (name, "@" or "/" or "", alias or number)."""
    return reference.partition("@") if "@" in reference else reference.partition("/")


def resolve_version(model_uri: str, settings: KeelSettings) -> tuple[str, str]:
    """``models:/name@alias`` or ``models:/name/N`` to (name, version)."""
    from mlflow.exceptions import MlflowException

    if not model_uri.startswith("models:/"):
        raise RegistryError(f"{model_uri}: expected a registry URI such as models:/medical-diagnosis@champion.")
    reference = model_uri[len("models:/"):]
    client = mlflow_client(settings)
    name, separator, version = split_model_reference(reference)
    try:
        if separator == "@":
            return name, str(client.get_model_version_by_alias(name, version).version)
        return name, str(client.get_model_version(name, version).version)
    except MlflowException as e:
        raise RegistryError(f"{model_uri}: not in the registry at {settings.mlflow_tracking_uri} "
                            f"({e.message}). `keel models list` shows what is."
                            + empty_local_registry_hint(client, settings)) from e


def empty_local_registry_hint(client: MlflowClient, settings: KeelSettings) -> str:
    """Why a lookup in Keel's own local store found no model at all, where one was expected (empty for a store
    the user named, or one that holds models)."""
    hint = local_store_hint(settings)
    if not hint or client.search_registered_models(max_results=1):
        return ""
    return f" No model is registered in {settings.home} at all. {hint}"


def local_store_hint(settings: KeelSettings) -> str:
    """Where Keel's local store is, for a command that found it empty: most often it ran in another directory
    than `keel run` did, and ``KEEL_HOME`` (default ``.keel``) is relative to that."""
    if settings.mlflow_tracking_uri != settings.local_tracking_uri:
        return ""
    return ("Keel keeps its local runs and registry in KEEL_HOME, by default .keel in the directory it runs from: "
            "run this where `keel run` ran, or set KEEL_HOME to that directory's .keel.")


def same_registered_version(first_uri: str, second_uri: str, settings: KeelSettings) -> bool:
    """Whether two registry URIs (an alias, a number) name one model version; False if either names none."""
    try:
        return resolve_version(first_uri, settings) == resolve_version(second_uri, settings)
    except RegistryError:
        return False


def champion_version(client: MlflowClient, model_name: str) -> str | None:
    """The version the ``champion`` alias points at, or None (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, CHAMPION).version)
    except MlflowException:
        return None


def pipeline_run(settings: KeelSettings, pipeline_run_id: str, pipeline: str) -> str:
    """The MLflow run id for this pipeline run, creating the run on first use."""
    client = mlflow_client(settings)
    experiment = experiment_id(client, settings, pipeline)
    found = client.search_runs([experiment], filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run_id}'",
                               max_results=1)
    if found:
        return str(found[0].info.run_id)
    # named as `keel run` and Kubeflow name the run; its experiment says which pipeline it is
    run = client.create_run(experiment, run_name=pipeline_run_id, tags={
        PIPELINE_RUN_TAG: pipeline_run_id, PIPELINE_TAG: pipeline, GIT_COMMIT_TAG: git_commit(settings)})
    return str(run.info.run_id)


def mlflow_run_url(tracking_uri: str, experiment_id: str | None, run_id: str | None) -> str | None:
    """The run's page in MLflow's UI: the server's own, or the one ``mlflow ui`` opens on a local store."""
    if not experiment_id or not run_id or tracking_uri.startswith("databricks"):
        return None
    ui = tracking_uri.rstrip("/") if is_tracking_server(tracking_uri) else LOCAL_MLFLOW_UI
    return f"{ui}/#/experiments/{experiment_id}/runs/{run_id}"


def experiment_ids(client: MlflowClient, deleted_too: bool = False, page_size: int = 1000) -> list[str]:
    """Every experiment's id, for searches across all of them (MLflow's search_runs needs the ids)."""
    from mlflow.entities import ViewType

    view = ViewType.ALL if deleted_too else ViewType.ACTIVE_ONLY
    return [experiment.experiment_id
            for experiment in every_page(client.search_experiments, view_type=view, max_results=page_size)]


def runs_of_pipeline_run(client: MlflowClient, pipeline_run_id: str) -> list[Any]:
    """The MLflow runs a pipeline run logged to, in whichever experiment: a retraining pipeline's runs are in
    the experiment of the pipeline it retrains, and KEEL_EXPERIMENT_NAME may have changed since."""
    return list(every_page(client.search_runs, experiment_ids=experiment_ids(client),
                           filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run_id}'"))


class MetricBuffer:
    """Collects metrics and sends them in one ``log_batch`` call at most every ``interval_s``.

    One MLflow call costs milliseconds (tens against a remote server); logging
    each epoch's metrics separately would cost more than a small model's epoch.
    """

    def __init__(self, client: MlflowClient, run_id: str, interval_s: float = 5.0) -> None:
        self._client = client
        self._run_id = run_id
        self._interval_s = interval_s
        self._pending: list = []
        self._last_flush = time.monotonic()
        self.seconds_spent = 0.0

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        self._pending += [Metric(key, float(value), now_ms, step) for key, value in metrics.items()]
        if time.monotonic() - self._last_flush >= self._interval_s:
            self.flush()

    def flush(self) -> None:
        started = time.monotonic()
        for offset in range(0, len(self._pending), 1000):  # MLflow's per-call metric limit
            self._client.log_batch(self._run_id, metrics=self._pending[offset:offset + 1000])
        self._pending = []
        self._last_flush = time.monotonic()
        self.seconds_spent += self._last_flush - started


def logged_model_id(model_uri: str) -> str | None:
    """The MLflow 3 logged model a ``models:/<model_id>`` URI names; None for a registry URI
    (``models:/name/1``, ``models:/name@alias``) or any other."""
    path = model_uri.removeprefix("models:/") if model_uri.startswith("models:/") else ""
    return path if path and "/" not in path and "@" not in path else None


def version_logged_model_id(model_version: Any, run: Any) -> str | None:
    """The MLflow 3 logged model a registered version was made from: its ``model_id``, its source, or the one
    its run logged (a SQL registry does not keep ``model_id`` on the version itself). None for a version from
    before MLflow 3."""
    if getattr(model_version, "model_id", None):
        return str(model_version.model_id)
    if from_source := logged_model_id(str(model_version.source or "")):
        return from_source
    outputs = getattr(run, "outputs", None)
    logged = [output.model_id for output in getattr(outputs, "model_outputs", None) or []]
    return logged[0] if len(logged) == 1 else None


def served_schema(model_uri: str) -> tuple[list[str] | None, list[str] | None]:
    """The columns a registered model reads and the classes it predicts (its ``probability_<class>`` outputs), from
    its MLflow signature: what callers of the served model send and read. None where unknown (no signature, or a
    model that predicts no classes). Call after :func:`mlflow_client`, which points MLflow at the tracking
    server."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        signature = mlflow.models.get_model_info(model_uri).signature
    except (MlflowException, OSError):
        return None, None
    if signature is None:
        return None, None
    inputs = None if signature.inputs is None else list(signature.inputs.input_names())
    outputs = [] if signature.outputs is None else signature.outputs.input_names()
    classes = [name.removeprefix(PROBABILITY_PREFIX) for name in outputs if name.startswith(PROBABILITY_PREFIX)]
    return inputs, classes or None


def column_changes(before: list[str] | None, after: list[str] | None) -> str:
    """``adds X; drops Y`` between two models' columns (or classes); empty when they are the same or either is
    unknown."""
    if before is None or after is None:
        return ""
    added, dropped = [c for c in after if c not in before], [c for c in before if c not in after]
    return "; ".join(filter(None, (f"adds {', '.join(added)}" if added else "",
                                   f"drops {', '.join(dropped)}" if dropped else "")))
