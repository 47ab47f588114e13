"""What both batch engines share: a scoring function per model kind, the columns it reads, the output's
schema fixed before the first batch, and the row a refused batch is refused for.

The in-process engine and the Ray Data engine call the same functions, so a row scores the same whichever
scored it, and a bad value is refused with the same words.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pandas as pd

from keel.data.columns import name_key
from keel.errors import ConfigError, DataError

if TYPE_CHECKING:
    import pyarrow as pa

    from keel.intents.model import IntentModel
    from keel.recommend.recommender import Recommender
    from keel.serve.deployment import LoadedModel

TEXT_COLUMN, USER_COLUMN = "text", "user_id"
TEXTS_PER_FORWARD, USERS_PER_RANKING = 256, 1024

Scorer = Callable[[pd.DataFrame], pd.DataFrame]


def scorer_for(loaded: LoadedModel, k: int,
               input_column: str | None) -> tuple[Scorer, list[str], list[tuple[str, Any]]]:
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


def kept_columns(source: str, header: list[str], needed: list[str], keep: list[str] | None,
                 fields: list[tuple[str, Any]]) -> list[str]:
    """The input columns copied beside the predictions, once the file is known to hold what the model reads
    and no kept column would be overwritten by a prediction."""
    missing = [c for c in needed if c not in header]
    if missing:
        near = {name_key(c): c for c in header}
        similar = ", ".join(f"{near[name_key(c)]!r} for {c!r}" for c in missing if name_key(c) in near)
        raise DataError(f"{source}: the model reads column(s) {missing}, which the file does not have; "
                        f"it has {header}." + (f" Near names in the file: {similar}." if similar else ""))
    kept = header if keep is None else keep
    unknown = [c for c in kept if c not in header]
    if unknown:
        raise DataError(f"{source}: keep (--keep, predict.keep) names column(s) {unknown} that the file does not have; "
                        f"it has {header}.")
    clashes = sorted(set(kept) & {name for name, _ in fields})
    if clashes:
        raise DataError(f"{source}: column(s) {clashes} would be overwritten by the predictions; "
                        "leave them out of keep (--keep, predict.keep).")
    return kept


def output_schema(input_schema: pa.Schema, kept: list[str], fields: list[tuple[str, Any]]) -> pa.Schema:
    """The kept input columns with their own types, then the predictions'."""
    import pyarrow as pa

    return pa.schema([*(input_schema.field(name) for name in kept), *fields])


def scored_table(batch: pd.DataFrame, kept: list[str], scorer: Scorer, schema: pa.Schema) -> pa.Table:
    """One batch's output rows: the kept columns, then what ``scorer`` predicts for each row.

    Without pandas' metadata: it would record the batch's pandas dtypes, and Ray Data hands its actors
    Arrow-backed columns, so the same file would read back as ``int64[pyarrow]`` from one engine and ``int64``
    from the other."""
    import pyarrow as pa

    scored = scorer(batch).set_axis(batch.index)
    both = pd.concat([batch[kept], scored[schema.names[len(kept):]]], axis=1)
    return pa.Table.from_pandas(both, schema=schema, preserve_index=False).replace_schema_metadata()


def scoring_manifest(loaded: LoadedModel, source: str, rows: int, columns: list[str], kept: list[str],
                     predictions: str, engine: str) -> dict[str, Any]:
    """What either engine records about a scored table: the resolved version, the rows and the columns."""
    where = " on Ray" if engine == "ray" else ""
    return {"model_uri": f"models:/{loaded.name}/{loaded.version}", "model_name": loaded.name,
            "model_version": loaded.version, "source": source, "rows": rows, "columns": columns,
            "kept_columns": len(kept), "predictions": predictions, "engine": engine,
            "summary": f"{rows} rows scored by {loaded.name} v{loaded.version}{where}"}


def first_failing_row(batch: pd.DataFrame, scorer: Scorer) -> int:
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
