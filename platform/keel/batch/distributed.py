"""The ``ray`` batch engine: Ray Data streams Parquet through a pool of scoring actors.

For tables one process should not read whole: a Parquet file, or a directory or S3 prefix of part files as
data lakes hold them. The driver loads the registered model once, checks the files' schema against what the
model reads, and puts the model in Ray's object store; each actor takes it from there (workers need no registry
or S3 credentials for it) and scores a batch at a time with the local engine's functions. Ray Data streams
blocks from the files to the actors and on to the writers, so no process holds the table, and grows the actor
pool up to ``workers`` while there is work queued.

Nothing half-written is left: locally the parts go to a private directory published by rename; on S3 to the
output's own prefix, emptied first, with the manifest written last and the parts removed if a batch fails
(:func:`keel.storage.staged_for_other_writers`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keel import storage
from keel.batch import PredictConfig
from keel.batch.scorers import (first_failing_row, kept_columns, output_schema, scored_table, scorer_for,
                                scoring_manifest)
from keel.data.ingest import FORMATS
from keel.errors import ConfigError, DataError
from keel.settings import KeelSettings

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from keel.serve.deployment import LoadedModel

PARTS_DIRECTORY = "predictions"
# Ray hands the driver a worker's exception as its traceback text only; a refusal travels between these marks
REFUSED, REFUSED_END = "<<keel-refused>>", "<</keel-refused>>"
ROW_COLUMNS_SHOWN = 3


def score_on_ray(settings: KeelSettings, model_uri: str, source: str, output_uri: str,
                 predict: dict[str, Any]) -> dict[str, Any]:
    """Score every row of the Parquet ``source`` on the Ray cluster (the ``predict`` Ray stage).

    Returns:
        The published manifest: model version, rows, output columns, the source's files.
    """
    from keel.serve.deployment import load_registered
    from keel.train.trainer import ray_session

    config = PredictConfig(**predict)
    if config.keep == []:
        raise ConfigError("the ray engine writes rows in no fixed order, so its predictions need a column to join "
                          "them back on: keep (--keep, predict.keep) at least an id column.")
    _check_parquet(source)
    loaded = load_registered(model_uri, settings)
    _, needed, fields = scorer_for(loaded, config.k, config.input_column)
    with ray_session(settings), storage.staged_for_other_writers(output_uri, "predict", settings) as out:
        dataset, files, input_schema = _read(source, settings)
        kept = kept_columns(source, list(input_schema.names), needed, config.keep, fields)
        schema = output_schema(input_schema, kept, fields)
        parts = out.target(PARTS_DIRECTORY)
        _write(_scored(dataset, loaded, config, kept, schema), source, parts, settings)
        out.manifest.update(scoring_manifest(loaded, source, _rows_in(parts, settings), list(schema.names), kept,
                                             out.uri_of(PARTS_DIRECTORY), "ray"), source_files=files)
    return out.manifest


class ScoringActor:
    """One member of Ray Data's actor pool: the model, deserialized once, scoring a batch per call."""

    def __init__(self, model: Any, k: int, input_column: str | None, kept: list[str], schema: pa.Schema,
                 threads: int) -> None:
        import ray
        import torch

        torch.set_num_threads(threads)  # the CPUs the actor reserved, not every core of a shared node
        loaded: LoadedModel = ray.get(model) if isinstance(model, ray.ObjectRef) else model
        self.scorer, _, _ = scorer_for(loaded, k, input_column)
        self.kept, self.schema = kept, schema

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        try:
            return scored_table(batch, self.kept, self.scorer, self.schema)
        except DataError as e:
            row = batch.iloc[first_failing_row(batch, self.scorer)]
            raise DataError(f"{REFUSED}the row with {_describe(row, self.kept)}: {e}{REFUSED_END}") from e


def _describe(row: pd.Series, kept: list[str]) -> str:
    """The failing row by its first kept columns (an id, where ``keep`` names one): rows have no global number
    once Ray Data has split the files into blocks."""
    values = {name: row[name].item() if hasattr(row[name], "item") else row[name] for name in kept[:ROW_COLUMNS_SHOWN]}
    return ", ".join(f"{name}={value!r}" for name, value in values.items())


def _check_parquet(source: str) -> None:
    suffix = Path(storage.filename(source)).suffix.lower()  # none, for a directory or prefix of parts
    if storage.parse(source).scheme not in ("file", "s3") or FORMATS.get(suffix, "parquet") != "parquet":
        raise DataError(f"{source}: the ray engine reads Parquet: a file, or a directory or s3:// prefix of part "
                        "files. Convert it, or score it with the local engine (engine: local, without --ray), "
                        "which also reads CSV, JSONL and http(s)://.")


def _read(source: str, settings: KeelSettings) -> tuple[Any, list[str], pa.Schema]:
    """The source as a Ray Dataset over its part files, the files, and their schema, from the files' footers;
    a DataError naming the source if it holds no rows.

    The output's rows are not in the source's order: Ray Data does not promise order through an actor pool
    (``preserve_order`` still let batches swap in one run of four here), so users join on a kept id."""
    import pyarrow as pa
    import pyarrow.dataset
    import ray.data

    filesystem, path = storage.pyarrow_filesystem(source, settings)
    try:
        parts = pyarrow.dataset.dataset(path, filesystem=filesystem, format="parquet")
        files, rows, schema = sorted(parts.files), parts.count_rows(), parts.schema
    except (OSError, ValueError, pa.ArrowException) as e:
        raise DataError(f"{source}: cannot read it as Parquet ({type(e).__name__}: {e}).") from e
    if not rows:
        raise DataError(f"{source}: no rows to score.")
    prefix = "s3://" if storage.parse(source).scheme == "s3" else ""
    try:
        dataset = ray.data.read_parquet(files, filesystem=filesystem)
    except pa.ArrowException as e:  # Ray unifies every part's schema first
        raise DataError(f"{source}: its part files do not agree on the columns' types ({e}); write each column "
                        "with one type in every part.") from e
    return dataset, [prefix + f for f in files], schema


def _scored(dataset: Any, loaded: LoadedModel, config: PredictConfig, kept: list[str], schema: pa.Schema) -> Any:
    import ray
    import ray.data

    workers = config.workers or max(1, int(ray.cluster_resources().get("CPU", 1) // config.cpus_per_worker))
    model = ray.put(loaded)
    return dataset.map_batches(
        ScoringActor, batch_size=config.batch_rows, batch_format="pandas", num_cpus=config.cpus_per_worker,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
        fn_constructor_kwargs={"model": model, "k": config.k, "input_column": config.input_column, "kept": kept,
                               "schema": schema, "threads": max(1, int(config.cpus_per_worker))})


def _write(scored: Any, source: str, target: str, settings: KeelSettings) -> None:
    """Run the pipeline into Parquet parts; a row an actor refused is a DataError in the user's words."""
    filesystem, path = storage.pyarrow_filesystem(target, settings)
    try:
        scored.write_parquet(path, filesystem=filesystem)
    except Exception as e:
        refused = re.search(f"{re.escape(REFUSED)}(.*?){re.escape(REFUSED_END)}", str(e), re.DOTALL)
        if refused is None:
            raise
        raise DataError(f"{source}, {refused.group(1)}") from None


def _rows_in(parts: str, settings: KeelSettings) -> int:
    """Rows written, from the parts' footers."""
    import pyarrow.dataset

    filesystem, path = storage.pyarrow_filesystem(parts, settings)
    return int(pyarrow.dataset.dataset(path, filesystem=filesystem, format="parquet").count_rows())
