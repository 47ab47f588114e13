"""Interactions in, per-user leave-latest-out splits out.

The builtin source is a seeded generator: users and items get latent taste
vectors, items a Zipf popularity, and each user's events are drawn from
taste plus popularity, so both a most-popular list and a personalised model
have something to find. A user's latest interactions are held out: the model
is scored on what each user did next, as in production.

Ids are the user's own: integers from a database (sparse, in the billions) or
text (SKUs, UUIDs). The splits number users and items 0..N-1 in id order, the
row of each in the model, and ``user_ids.parquet`` / ``item_ids.parquet`` keep
the ids to map back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from keel import storage
from keel.data import tables
from keel.errors import DataError
from keel.recommend.config import InteractionColumns, InteractionsConfig, SplitConfig
from keel.settings import KeelSettings

BUILTIN_SOURCE = "builtin://ecommerce_interactions"
DEFAULT_COLUMNS = InteractionColumns()
ID_FILES = {"user_id": "user_ids.parquet", "item_id": "item_ids.parquet"}
EVENTS = ("view", "cart", "purchase")
SPLIT_FILES = {"train": "train.parquet", "val": "val.parquet", "test": "test.parquet"}
POPULARITY_FILE = "popularity.parquet"


def generate_interactions(config: InteractionsConfig) -> pd.DataFrame:
    """Seeded implicit feedback: one row per (user, item) event, ordered by time within each user."""
    rng = np.random.default_rng(config.seed)
    scale = 1.0 / np.sqrt(config.factors)
    users = rng.normal(0.0, scale, (config.users, config.factors)).astype(np.float32)
    items = rng.normal(0.0, scale, (config.items, config.factors)).astype(np.float32)
    popularity = -config.popularity_skew * np.log(rng.permutation(config.items) + 1.0)
    counts = np.clip(rng.lognormal(np.log(config.mean_interactions), 0.5, config.users).astype(int),
                     2, config.items // 2)
    rows = []
    for user in range(config.users):
        affinity = config.taste_strength * np.sqrt(config.factors) * (items @ users[user]) + popularity
        gumbel = -np.log(-np.log(rng.uniform(1e-12, 1.0, config.items)))
        chosen = np.argpartition(-(affinity + gumbel), counts[user])[:counts[user]]
        rng.shuffle(chosen)  # the order a user met them in: not by preference
        strength = 1.0 / (1.0 + np.exp(-affinity[chosen]))
        draws = rng.uniform(size=len(chosen))
        events = np.where(draws < 0.15 * strength, 2, np.where(draws < 0.4 * strength, 1, 0))
        times = np.sort(rng.integers(1_700_000_000, 1_730_000_000, len(chosen)))
        rows.append(np.column_stack([np.full(len(chosen), user), chosen, events, times]))
    table = np.concatenate(rows)
    return pd.DataFrame({"user_id": table[:, 0], "item_id": table[:, 1],
                         "event": pd.Categorical.from_codes(table[:, 2], EVENTS).astype(str),
                         "timestamp": table[:, 3]})


def check_interactions(frame: pd.DataFrame, origin: str,
                       columns: InteractionColumns = DEFAULT_COLUMNS) -> pd.DataFrame:
    """The columns the stages need, under their names, with usable values; a DataError names the column
    otherwise."""
    frame = columns.select(frame, origin, "interactions.columns")
    frame = frame.assign(timestamp=_epoch_seconds(frame["timestamp"]),
                         **{column: _ids(frame[column], origin, getattr(columns, column)) for column in ID_FILES})
    _check_integers(frame["timestamp"], origin, columns.timestamp, "non-negative integers or ISO 8601 date-times")
    frame = frame.astype({"timestamp": "int64"})
    if "event" in frame.columns:
        unknown = sorted(set(frame["event"].astype(str)) - set(EVENTS))
        if unknown:
            raise DataError(f"{origin}: column {columns.event!r}: unknown value(s) {unknown[:5]}; expected one of "
                            f"{list(EVENTS)} (or set interactions.columns.event: null to ignore the column).")
        frame = frame.astype({"event": "str"})
    if "rating" in frame.columns:
        ratings = pd.to_numeric(frame["rating"], errors="coerce")
        if ratings.isna().any():
            raise DataError(f"{origin}: column {columns.rating!r}: {int(ratings.isna().sum())} value(s) are not "
                            "numbers.")
        frame = frame.assign(rating=ratings)
    return frame


def keep_liked(frame: pd.DataFrame, min_rating: float | None, origin: str) -> tuple[pd.DataFrame, int]:
    """Explicit ratings made implicit: the interactions rated ``min_rating`` or more (what a user liked), and
    how many were dropped. Without ``min_rating`` every interaction counts as seen."""
    if min_rating is None:
        return frame, 0
    if "rating" not in frame.columns:
        raise DataError(f"{origin}: interactions.min_rating is set but the source has no ratings; it applies to a "
                        "file with a rating column (interactions.columns.rating).")
    liked = frame[frame["rating"] >= min_rating]
    if liked.empty:
        raise DataError(f"{origin}: no interaction is rated {min_rating} or more (ratings run "
                        f"{frame['rating'].min()}..{frame['rating'].max()}); lower interactions.min_rating.")
    return liked, len(frame) - len(liked)


def _ids(column: pd.Series, origin: str, name: str) -> pd.Series:
    """Integer ids (all values numbers: each a non-negative integer) or text ids (SKUs, UUIDs: any other
    column), never missing. A column of numbers with a stray negative or fraction is an error, not text.
    Errors say ``name``, the file's own name for the column."""
    missing = int(column.isna().sum())
    if missing:
        raise DataError(f"{origin}: column {name!r}: {missing} value(s) are missing; every interaction needs a "
                        "user and an item id.")
    if pd.to_numeric(column, errors="coerce").notna().all():
        _check_integers(column, origin, name, "non-negative integers (or text ids)")
        return column.astype("int64")
    return column.astype(str)


def _check_integers(column: pd.Series, origin: str, name: str, kinds: str) -> None:
    values = pd.to_numeric(column, errors="coerce")
    bad = int(values.isna().sum() + (values < 0).sum())
    if bad or not np.all(np.mod(values.fillna(0), 1) == 0):
        raise DataError(f"{origin}: column {name!r}: {bad or 'some'} value(s) are not {kinds}.")


def _epoch_seconds(column: pd.Series) -> pd.Series:
    """Timestamps as integers (any unit; only their order is used) or as date-times (a Parquet timestamp,
    or ISO 8601 text as most exports write it), which become seconds since 1970 (UTC when no zone is given)."""
    if not pd.api.types.is_datetime64_any_dtype(column):
        if pd.to_numeric(column, errors="coerce").notna().all():
            return column
        parsed = pd.to_datetime(column, errors="coerce", utc=True, format="ISO8601")
        if not parsed.notna().any():  # neither: the caller reports the column
            return column
        column = parsed  # the values that are not date-times are now missing, and reported as such
    if column.dt.tz is None:
        column = column.dt.tz_localize("UTC")
    return (column - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)


def number_ids(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Users and items renumbered 0..N-1 in id order (the model's rows), and the ids in that order."""
    numbered = {column: pd.factorize(frame[column], sort=True) for column in ID_FILES}
    return (frame.assign(**{column: codes for column, (codes, _) in numbered.items()}),
            {column: np.asarray(ids) for column, (_, ids) in numbered.items()})


def read_interactions(source: str, config: InteractionsConfig, settings: KeelSettings) -> pd.DataFrame:
    """The builtin generator's table, or a user's Parquet/CSV file with the same columns."""
    if source == BUILTIN_SOURCE:
        return generate_interactions(config)
    if source.startswith("builtin://"):
        raise DataError(f"{source}: no such bundled dataset; this pipeline knows {BUILTIN_SOURCE}.")
    frame = tables.read_table(source, settings, "interactions")
    return check_interactions(frame, source, config.columns)


def split_latest(frame: pd.DataFrame, config: SplitConfig) -> dict[str, pd.DataFrame]:
    """Per user by time: the last ``holdout_per_user`` to test, the one before to validation, the rest to train.

    Users with too few interactions stay wholly in train: they still teach the
    item embeddings, and scoring them on one remaining item would be noise.
    """
    ordered = frame.sort_values(["user_id", "timestamp"], kind="stable")
    position_from_end = ordered.groupby("user_id").cumcount(ascending=False)
    sizes = ordered.groupby("user_id")["item_id"].transform("size")
    testable = sizes >= config.holdout_per_user + 1 + config.min_train_interactions
    test = testable & (position_from_end < config.holdout_per_user)
    val = testable & (position_from_end == config.holdout_per_user)
    return {"train": ordered[~(test | val)], "val": ordered[val], "test": ordered[test]}


def prepare(source: str, interactions: InteractionsConfig, split: SplitConfig, output_uri: str,
            settings: KeelSettings) -> dict[str, Any]:
    """Read or generate the interactions, split them, and publish the splits with item popularity."""
    frame, disliked = keep_liked(read_interactions(source, interactions, settings), interactions.min_rating, source)
    frame = frame.drop_duplicates(["user_id", "item_id"], keep="first")  # implicit feedback: seen or not
    frame, ids = number_ids(frame)
    splits = split_latest(frame, split)
    if splits["test"].empty:
        raise DataError(f"{source}: no user has the {split.holdout_per_user + 1 + split.min_train_interactions} "
                        "interactions needed to hold some out; lower split.holdout_per_user or "
                        "split.min_train_interactions.")
    popularity = splits["train"]["item_id"].value_counts().rename_axis("item_id").reset_index(name="count")
    with storage.staged_output(output_uri, "ingest", settings) as out:
        for name, part in splits.items():
            part.to_parquet(out.path(SPLIT_FILES[name]), index=False)
        popularity.to_parquet(out.path(POPULARITY_FILE), index=False)
        for column, file in ID_FILES.items():
            pd.DataFrame({"id": ids[column]}).to_parquet(out.path(file), index=False)
        out.manifest.update(
            source=source, rows=len(frame), users=len(ids["user_id"]), items=len(ids["item_id"]),
            splits={name: out.uri_of(file) for name, file in SPLIT_FILES.items()},
            popularity=out.uri_of(POPULARITY_FILE), ids={c: out.uri_of(file) for c, file in ID_FILES.items()},
            split_rows={name: len(part) for name, part in splits.items()}, rated_below_min_rating=disliked,
            events={event: int(n) for event, n in frame["event"].value_counts().items()} if "event" in frame else {},
            summary=(f"{len(frame)} interactions, {frame['user_id'].nunique()} users, "
                     f"{frame['item_id'].nunique()} items; {len(splits['test'])} held out"
                     + (f"; {disliked} rated below {interactions.min_rating} left out" if disliked else "")),
        )
    return out.manifest
