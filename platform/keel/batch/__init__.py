"""Batch scoring: a registered model over a whole table, published as Parquet with a manifest.

What ``keel serve`` answers one request at a time, for a file. The model is
loaded the way the server loads it (:func:`keel.serve.deployment.load_registered`).
Two engines score with the same functions (:mod:`keel.batch.scorers`):

- ``local``: this process reads the table the way ``keel run`` reads a source
  (same parsing, same checks) and scores it a batch of rows at a time into one
  Parquet file;
- ``ray``: Ray Data streams a Parquet file, or a directory or prefix of them,
  through a pool of scoring actors on the Ray cluster (``KEEL_RAY_ADDRESS``,
  as a Ray job, or a local Ray), for tables one machine should not hold
  (:mod:`keel.batch.distributed`).

Either way the output appears at its URI only once every row is scored, so a
bad value in the last row leaves nothing behind.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from keel import storage
from keel.batch.scorers import (Scorer, first_failing_row, kept_columns, output_schema, scored_table,
                                scorer_for, scoring_manifest)
from keel.config import PipelineConfigBase
from keel.data.ingest import read_source, sha256_file
from keel.errors import ConfigError, DataError
from keel.settings import KeelSettings

if TYPE_CHECKING:
    import pandas as pd

    from keel.serve.deployment import LoadedModel

PREDICTIONS_FILE = "predictions.parquet"
DEFAULT_BATCH_ROWS = 50_000


class PredictConfig(BaseModel):
    """How a table is scored: by ``keel predict``'s options, or the batch_scoring pipeline's predict section."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    keep: list[str] | None = Field(default=None, description="input columns copied beside the predictions; "
                                                              "null: every column")
    k: int = Field(default=10, ge=1, le=1000, description="items per user, for a recommender")
    batch_rows: int = Field(default=DEFAULT_BATCH_ROWS, ge=1, description="rows per forward pass")
    input_column: str | None = Field(default=None, min_length=1,
                                     description="the file's text or user-id column; null: text or user_id")
    engine: Literal["local", "ray"] = Field(
        default="local", description="local: this process reads the table whole (CSV, Parquet or JSONL); ray: "
                                     "Ray Data streams Parquet files through scoring actors on the Ray cluster")
    workers: int | None = Field(default=None, ge=1, description="ray: the most scoring actors; null: one per CPU "
                                                                 "the cluster has now")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="ray: CPUs each scoring actor reserves "
                                                                  "(and torch's thread count in it)")


class BatchScoringConfig(PipelineConfigBase):
    """The ``batch_scoring`` pipeline's config: one section, no registry (it registers nothing)."""

    predict: PredictConfig = PredictConfig()


def score_table(model_uri: str, source: str, output_uri: str, settings: KeelSettings,
                predict: PredictConfig = PredictConfig()) -> dict[str, Any]:
    """Score every row of ``source`` with ``model_uri`` into ``output_uri``.

    Args:
        model_uri: ``models:/NAME@ALIAS`` or ``models:/NAME/N``; resolved to a version once, recorded.
        source: ``local`` engine: a CSV, Parquet or JSONL file (path, ``s3://``, ``http(s)://``); ``ray``
            engine: a Parquet file, or a directory or ``s3://`` prefix of them.
        output_uri: a directory (path or ``s3://``): the predictions and ``manifest.json``.
        predict: which columns are kept, batch size, items per user, the input column and the engine.

    Returns:
        The published manifest: model version, rows, output columns, source.
    """
    if predict.engine == "ray":
        from keel import jobs

        # on a KubeRay cluster a Ray job, so the actors run where the data and the CPUs are
        return dict(jobs.run_stage("predict", {"model_uri": model_uri, "source": source, "output_uri": output_uri,
                                               "predict": predict.model_dump()}, settings))
    from keel.serve.deployment import load_registered

    return score_loaded(load_registered(model_uri, settings), source, output_uri, settings, predict)


def score_loaded(loaded: LoadedModel, source: str, output_uri: str, settings: KeelSettings,
                 predict: PredictConfig = PredictConfig()) -> dict[str, Any]:
    """The ``local`` engine: :func:`score_table` in this process, with the model already loaded."""
    scorer, needed, fields = scorer_for(loaded, predict.k, predict.input_column)
    with storage.staged_output(output_uri, "predict", settings) as out, \
            tempfile.TemporaryDirectory(prefix="keel-predict-") as scratch:
        frame, local, _ = read_source(source, Path(scratch), settings)
        kept = kept_columns(source, list(map(str, frame.columns)), needed, predict.keep, fields)
        columns = _write_predictions(frame, kept, scorer, fields, predict.batch_rows, out.path(PREDICTIONS_FILE),
                                     source)
        out.manifest.update(scoring_manifest(loaded, source, len(frame), columns, kept,
                                             out.uri_of(PREDICTIONS_FILE), "local"), sha256=sha256_file(local))
    return out.manifest


def score_with_config(model_uri: str, source: str, output_uri: str, config: Any,
                      settings: KeelSettings) -> dict[str, Any]:
    """The batch_scoring pipeline's predict step: :func:`score_table` with the config's ``predict`` section."""
    if not isinstance(config, BatchScoringConfig):
        raise ConfigError(f"the predict step reads a batch_scoring config, not {config.pipeline!r}'s.")
    return score_table(model_uri, source, output_uri, settings, config.predict)


def _write_predictions(frame: pd.DataFrame, kept: list[str], scorer: Scorer, fields: list[tuple[str, Any]],
                       batch_rows: int, path: Path, source: str) -> list[str]:
    """Score ``frame`` a batch at a time into one Parquet file (a row group per batch); returns its columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not len(frame):
        raise DataError(f"{source}: no rows to score.")
    schema = output_schema(pa.Schema.from_pandas(frame[kept], preserve_index=False), kept, fields)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, len(frame), batch_rows):
            batch = frame.iloc[start:start + batch_rows]
            try:
                writer.write_table(scored_table(batch, kept, scorer, schema))
            except DataError as e:
                row = start + first_failing_row(batch, scorer) + 1
                raise DataError(f"{source}, data row {row} (of rows {start + 1}-{start + len(batch)} in this batch): "
                                f"{e}") from e
    return list(schema.names)
