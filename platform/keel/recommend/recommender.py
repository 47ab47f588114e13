"""Top-k items for user ids: what the registered model and the serving route answer.

A known user gets the factorization's best items they have not interacted
with; an unknown user gets the most-popular list, and every answer says which
of the two it is. Users and items are the caller's own ids; the model's rows
are their positions in the sorted id lists packaged beside it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from keel.recommend.data import ID_FILES
from keel.recommend.metrics import Scorer, seen_items, top_k_unseen
from keel.recommend.model import MatrixFactorization, load_factorization

POPULARITY_FILE = "popularity.parquet"
SEEN_FILE = "seen.parquet"
MAX_K = 100
Id = int | str  # a caller's user or item id: integers from a database, or text (SKUs, UUIDs)
INT64 = np.iinfo(np.int64)


def rows_of(ids: np.ndarray, wanted: Any) -> np.ndarray:
    """Each wanted id's position in the sorted ``ids`` (its row in the model), -1 where it is not there.

    Wanted ids are read as the kind ``ids`` are: with text ids a number is its text, with integer ids a
    decimal text is its number; anything else (other text, a negative, a JSON integer beyond int64) is no id.
    """
    if not len(ids):
        return np.full(len(wanted), -1, dtype=np.int64)
    integers = ids.dtype.kind in "iu"
    values = np.array([_as_integer_id(w) if integers else str(w) for w in np.asarray(wanted).tolist()],
                      dtype=np.int64 if integers else object)
    rows = np.searchsorted(ids, values)
    found = (rows < len(ids)) & (ids[np.minimum(rows, len(ids) - 1)] == values)
    return np.where(found, rows, -1)


def id_type(ids: np.ndarray) -> type[int] | type[str]:
    return int if ids.dtype.kind in "iu" else str


def _as_integer_id(value: Any) -> int:
    number = int(value) if isinstance(value, (int, np.integer)) or (isinstance(value, str) and value.isdecimal()) \
        else -1
    return number if 0 <= number <= INT64.max else -1


@dataclass
class Recommender:
    model: MatrixFactorization
    popular: np.ndarray  # item rows, most popular first
    seen: dict[int, np.ndarray]  # user row -> item rows
    user_ids: np.ndarray  # the ids of the model's user rows, sorted
    item_ids: np.ndarray

    @classmethod
    def load(cls, directory: Path) -> Recommender:
        popularity = pd.read_parquet(directory / POPULARITY_FILE).sort_values("count", ascending=False, kind="stable")
        model = load_factorization(directory)
        rows = {"user_id": model.user.num_embeddings, "item_id": model.item.num_embeddings}
        ids = {column: pd.read_parquet(directory / file)["id"].to_numpy() if (directory / file).exists()
               else np.arange(rows[column]) for column, file in ID_FILES.items()}  # packaged before ids were
        return cls(model, popularity["item_id"].to_numpy(), seen_items(pd.read_parquet(directory / SEEN_FILE)),
                   ids["user_id"], ids["item_id"])

    @staticmethod
    def package(model_dir: Path, popularity: pd.DataFrame, train: pd.DataFrame, ids: dict[str, pd.DataFrame],
                directory: Path) -> Path:
        """One directory with everything :meth:`load` needs: weights, popularity, training interactions, ids."""
        shutil.copytree(model_dir, directory, dirs_exist_ok=True)
        popularity.to_parquet(directory / POPULARITY_FILE, index=False)
        train[["user_id", "item_id"]].to_parquet(directory / SEEN_FILE, index=False)
        for column, file in ID_FILES.items():
            ids[column].to_parquet(directory / file, index=False)
        return directory

    @property
    def user_id_type(self) -> type[int] | type[str]:
        """How the caller names users, integers or text: the API and pyfunc take that kind."""
        return id_type(self.user_ids)

    @property
    def item_id_type(self) -> type[int] | type[str]:
        """How the caller names items (may differ from users': text customer ids, integer article ids)."""
        return id_type(self.item_ids)

    def scorer(self, user_ids: np.ndarray, item_ids: np.ndarray) -> Scorer:
        """This model's scores in another run's numbering (``user_ids``/``item_ids``: its rows' ids), so a
        champion is rescored on a challenger's rows: its own scores for users it knows, its popular list's
        order for the others (what it would answer them), and nothing for items it never saw."""
        columns = rows_of(self.item_ids, item_ids)
        has_item = columns >= 0
        same_items = len(columns) == len(self.item_ids) and bool((columns == np.arange(len(columns))).all())
        by_popularity = np.full(len(self.item_ids), -np.inf, dtype=np.float32)
        by_popularity[self.popular] = -np.arange(len(self.popular), dtype=np.float32)

        def score(users: np.ndarray) -> np.ndarray:
            rows = rows_of(self.user_ids, user_ids[users])
            own = np.tile(by_popularity, (len(users), 1))
            known = rows >= 0
            if known.any():
                own[known] = self.model.score_all(torch.from_numpy(rows[known])).numpy()
            if same_items:  # the usual case: the catalogue did not change between the runs
                return own
            scores = np.full((len(users), len(item_ids)), -np.inf, dtype=np.float32)
            scores[:, has_item] = own[:, columns[has_item]]
            return scores

        return score

    def recommend(self, user_ids: list[Id], k: int = 10) -> list[dict[str, Any]]:
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k must be between 1 and {MAX_K}, got {k}")
        known = {user: int(row) for user, row in zip(user_ids, rows_of(self.user_ids, user_ids))
                 if row >= 0 and row in self.seen}
        ranked: dict[Id, tuple[list[Id], list[float]]] = {}
        if known:
            rows = np.array(list(known.values()))
            scores = self.model.score_all(torch.from_numpy(rows)).numpy()
            best = top_k_unseen(scores, rows, self.seen, k)
            for position, user in enumerate(known):
                unseen = best[position][best[position] >= 0]  # fewer than k when few are left
                ranked[user] = (self.item_ids[unseen].tolist(), [round(float(s), 5) for s in scores[position, unseen]])
        popular = self.item_ids[self.popular[:k]].tolist()
        return [{"user_id": u, "items": ranked[u][0], "scores": ranked[u][1], "known_user": True,
                 "source": "personalized"} if u in ranked else
                {"user_id": u, "items": popular, "scores": [], "known_user": False, "source": "popular"}
                for u in user_ids]
