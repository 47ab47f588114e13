"""Batch scoring: a registered model over a whole table, published as Parquet with a manifest.

What ``keel serve`` answers one request at a time, for a file. The model is
loaded the way the server loads it (:func:`keel.serve.deployment.load_registered`)
and the table is read the way ``keel run`` reads a source (same parsing, same
checks), so a row scores here as it scores in training's evaluation and behind
the API. Scoring goes a batch of rows at a time, each batch appended to one
Parquet file in a private directory; the output appears at its URI only once
every row is scored, so a bad value in the last row leaves nothing behind.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from keel import storage
from keel.config import PipelineConfigBase
from keel.data.ingest import read_source, sha256_file
from keel.errors import ConfigError, DataError
from keel.settings import KeelSettings

if TYPE_CHECKING:
    from keel.intents.model import IntentModel
    from keel.recommend.recommender import Recommender
    from keel.serve.deployment import LoadedModel

PREDICTIONS_FILE = "predictions.parquet"
TEXT_COLUMN, USER_COLUMN = "text", "user_id"
DEFAULT_BATCH_ROWS = 50_000
TEXTS_PER_FORWARD, USERS_PER_RANKING = 256, 1024

Scorer = Callable[[pd.DataFrame], pd.DataFrame]


class PredictConfig(BaseModel):
    """How the batch_scoring pipeline's predict step scores its source."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    keep: list[str] | None = Field(default=None, description="input columns copied beside the predictions; "
                                                              "null: every column")
    k: int = Field(default=10, ge=1, le=1000, description="items per user, for a recommender")
    batch_rows: int = Field(default=DEFAULT_BATCH_ROWS, ge=1, description="rows per forward pass")
    input_column: str | None = Field(default=None, min_length=1,
                                     description="the file's text or user-id column; null: text or user_id")


class BatchScoringConfig(PipelineConfigBase):
    """The ``batch_scoring`` pipeline's config: one section, no registry (it registers nothing)."""

    predict: PredictConfig = PredictConfig()


def score_table(model_uri: str, source: str, output_uri: str, settings: KeelSettings, keep: list[str] | None = None,
                batch_rows: int = DEFAULT_BATCH_ROWS, k: int = 10, input_column: str | None = None) -> dict[str, Any]:
    """Score every row of ``source`` with ``model_uri`` into ``output_uri``/predictions.parquet.

    Args:
        model_uri: ``models:/NAME@ALIAS`` or ``models:/NAME/N``; resolved to a version once, recorded.
        source: a CSV, Parquet or JSONL file (path, ``s3://``, ``http(s)://``).
        output_uri: a directory (path or ``s3://``): the predictions and ``manifest.json``.
        keep: input columns copied beside the predictions (default: all of them).
        batch_rows: rows per forward pass and per Parquet row group.
        k: items per user, for a recommender.
        input_column: the file's column of texts (a text classifier) or user ids (a recommender), when it is not
            ``text`` or ``user_id``: the name the training data used, such as MovieLens' ``userId``.

    Returns:
        The published manifest: model version, rows, output columns, source digest.
    """
    from keel.serve.deployment import load_registered

    return score_loaded(load_registered(model_uri, settings), source, output_uri, settings, keep, batch_rows, k,
                        input_column)


def score_loaded(loaded: LoadedModel, source: str, output_uri: str, settings: KeelSettings,
                 keep: list[str] | None = None, batch_rows: int = DEFAULT_BATCH_ROWS, k: int = 10,
                 input_column: str | None = None) -> dict[str, Any]:
    """:func:`score_table` with the model already loaded."""
    if batch_rows < 1 or k < 1:
        raise DataError(f"batch_rows and k must be at least 1 (got {batch_rows} and {k}).")
    scorer, needed, fields = _scorer(loaded, k, input_column)
    with storage.staged_output(output_uri, "predict", settings) as out, \
            tempfile.TemporaryDirectory(prefix="keel-predict-") as scratch:
        frame, local, _ = read_source(source, Path(scratch), settings)
        kept = _kept_columns(source, frame, needed, keep)
        columns = _write_predictions(frame, kept, scorer, fields, batch_rows, out.path(PREDICTIONS_FILE), source)
        out.manifest.update(model_uri=f"models:/{loaded.name}/{loaded.version}", model_name=loaded.name,
                            model_version=loaded.version, source=source, sha256=sha256_file(local), rows=len(frame),
                            columns=columns, kept_columns=len(kept), predictions=out.uri_of(PREDICTIONS_FILE),
                            summary=f"{len(frame)} rows scored by {loaded.name} v{loaded.version}")
    return out.manifest


def score_with_config(model_uri: str, source: str, output_uri: str, config: Any,
                      settings: KeelSettings) -> dict[str, Any]:
    """The batch_scoring pipeline's predict step: :func:`score_table` with the config's ``predict`` section."""
    if not isinstance(config, BatchScoringConfig):
        raise ConfigError(f"the predict step reads a batch_scoring config, not {config.pipeline!r}'s.")
    predict = config.predict
    return score_table(model_uri, source, output_uri, settings, keep=predict.keep, batch_rows=predict.batch_rows,
                       k=predict.k, input_column=predict.input_column)


def _scorer(loaded: LoadedModel, k: int, input_column: str | None) -> tuple[Scorer, list[str], list[tuple[str, Any]]]:
    """For the model's kind: the per-batch scoring function, the input columns it reads, and its prediction
    columns' types, fixed up front (a batch where every user is unknown, with empty score lists, must not
    decide the file's schema)."""
    import pyarrow as pa

    from keel.predictor import PREDICTION_COLUMN, PROBABILITY_PREFIX

    if loaded.predictor is not None:
        if input_column is not None:
            raise ConfigError(f"models:/{loaded.name}/{loaded.version} reads its training columns by name; "
                              "input_column is for text classifiers and recommenders.")
        fields = [(PREDICTION_COLUMN, pa.string()),
                  *((f"{PROBABILITY_PREFIX}{c}", pa.float64()) for c in loaded.predictor.classes)]
        return loaded.predictor.predict, loaded.predictor.transform.input_columns, fields
    if loaded.intents is not None:
        column = input_column or TEXT_COLUMN
        return (_classifier(loaded.intents, column), [column],
                [("intent", pa.string()), ("probability", pa.float64())])
    recommender, column = _recommender(loaded), input_column or USER_COLUMN
    item = pa.string() if recommender.item_id_type is str else pa.int64()
    return (_recommendations(recommender, k, column), [column],
            [("items", pa.list_(item)), ("scores", pa.list_(pa.float64())), ("known_user", pa.bool_()),
             ("source", pa.string())])


def _recommender(loaded: LoadedModel) -> Recommender:
    if loaded.recommender is None:
        raise DataError(f"models:/{loaded.name}/{loaded.version}: not a model Keel knows how to score.")
    return loaded.recommender


def _classifier(model: IntentModel, column: str) -> Scorer:
    def classify(batch: pd.DataFrame) -> pd.DataFrame:
        texts = batch[column]
        if texts.isna().any():
            raise DataError(f"column {column!r}: {int(texts.isna().sum())} empty text(s).")
        return pd.DataFrame(_chunked(model.classify, texts.astype(str).tolist(), TEXTS_PER_FORWARD))

    return classify


def _recommendations(recommender: Recommender, k: int, column: str) -> Scorer:
    def recommend(batch: pd.DataFrame) -> pd.DataFrame:
        users = batch[column]
        if users.isna().any():
            raise DataError(f"column {column!r}: {int(users.isna().sum())} missing user id(s).")
        kind = recommender.user_id_type
        try:
            ids = users.astype(kind).tolist()
        except (TypeError, ValueError) as e:
            raise DataError(f"column {column!r}: this model's user ids are {kind.__name__}s ({e}).") from e
        answers = pd.DataFrame(_chunked(lambda part: recommender.recommend(part, k), ids, USERS_PER_RANKING))
        return answers.drop(columns=[USER_COLUMN])

    return recommend


def _chunked(answer: Callable[[list[Any]], list[dict[str, Any]]], values: list[Any], size: int) -> list[dict[str, Any]]:
    """``answer`` over ``values`` a slice at a time: a transformer's activations, or a users x catalogue score
    matrix (50,000 users x 27,000 items is 5 GB), stay bounded whatever ``batch_rows`` is."""
    return [row for start in range(0, len(values), size) for row in answer(values[start:start + size])]


def _kept_columns(source: str, frame: pd.DataFrame, needed: list[str], keep: list[str] | None) -> list[str]:
    header = list(map(str, frame.columns))
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataError(f"{source}: the model reads column(s) {missing}, which the file does not have; "
                        f"it has {header}.")
    kept = header if keep is None else keep
    unknown = [c for c in kept if c not in header]
    if unknown:
        raise DataError(f"{source}: keep (--keep, predict.keep) names column(s) {unknown} that the file does not have; "
                        f"it has {header}.")
    return kept


def _write_predictions(frame: pd.DataFrame, kept: list[str], scorer: Scorer, fields: list[tuple[str, Any]],
                       batch_rows: int, path: Path, source: str) -> list[str]:
    """Score ``frame`` a batch at a time into one Parquet file (a row group per batch); returns its columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not len(frame):
        raise DataError(f"{source}: no rows to score.")
    clashes = sorted(set(kept) & {name for name, _ in fields})
    if clashes:
        raise DataError(f"{source}: column(s) {clashes} would be overwritten by the predictions; "
                        "leave them out of keep (--keep, predict.keep).")
    schema = pa.schema([*pa.Schema.from_pandas(frame[kept], preserve_index=False), *fields])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, len(frame), batch_rows):
            batch = frame.iloc[start:start + batch_rows]
            try:
                scored = scorer(batch).set_axis(batch.index)
            except DataError as e:
                row = start + _first_failing_row(batch, scorer) + 1
                raise DataError(f"{source}, data row {row} (of rows {start + 1}-{start + len(batch)} in this batch): "
                                f"{e}") from e
            both = pd.concat([batch[kept], scored[[name for name, _ in fields]]], axis=1)
            writer.write_table(pa.Table.from_pandas(both, schema=schema, preserve_index=False))
    return list(schema.names)


def _first_failing_row(batch: pd.DataFrame, scorer: Scorer) -> int:
    """The position of the first row the scorer refuses, by bisecting prefixes: on a failed batch only, so a
    user is told which row to fix, not only which batch."""
    good, bad = 0, len(batch)  # the first `good` rows score; the first `bad` rows do not
    while bad - good > 1:
        middle = (good + bad) // 2
        try:
            scorer(batch.iloc[:middle])
            good = middle
        except DataError:
            bad = middle
    return bad - 1
