"""Top-k items for user ids: what the registered model and the serving route answer.

A known user gets the factorization's best items they have not interacted
with; an unknown user (or one outside the trained id range) gets the
most-popular list, and every answer says which of the two it is.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from keel.recommend.metrics import seen_items, top_k
from keel.recommend.model import MatrixFactorization, load_factorization

POPULARITY_FILE = "popularity.parquet"
SEEN_FILE = "seen.parquet"
MAX_K = 100


@dataclass
class Recommender:
    model: MatrixFactorization
    popular: np.ndarray  # item ids, most popular first
    seen: dict[int, np.ndarray]

    @classmethod
    def load(cls, directory: Path) -> Recommender:
        popularity = pd.read_parquet(directory / POPULARITY_FILE).sort_values("count", ascending=False, kind="stable")
        return cls(load_factorization(directory), popularity["item_id"].to_numpy(),
                   seen_items(pd.read_parquet(directory / SEEN_FILE)))

    @staticmethod
    def package(model_dir: Path, popularity: pd.DataFrame, train: pd.DataFrame, directory: Path) -> Path:
        """One directory with everything :meth:`load` needs: weights, popularity, training interactions."""
        shutil.copytree(model_dir, directory, dirs_exist_ok=True)
        popularity.to_parquet(directory / POPULARITY_FILE, index=False)
        train[["user_id", "item_id"]].to_parquet(directory / SEEN_FILE, index=False)
        return directory

    @property
    def users(self) -> int:
        return int(self.model.user.num_embeddings)

    def recommend(self, user_ids: list[int], k: int = 10) -> list[dict[str, Any]]:
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k must be between 1 and {MAX_K}, got {k}")
        known = [u for u in user_ids if 0 <= u < self.users and u in self.seen]
        ranked: dict[int, tuple[list[int], list[float]]] = {}
        if known:
            scores = self.model.score_all(torch.tensor(known)).numpy().astype(np.float64)
            for row, user in enumerate(known):
                scores[row, self.seen[user]] = -np.inf
            best = top_k(scores, k)
            for row, user in enumerate(known):
                ranked[user] = (best[row].tolist(), [round(float(s), 5) for s in scores[row, best[row]]])
        popular = self.popular[:k].tolist()
        return [{"user_id": u, "items": ranked[u][0], "scores": ranked[u][1], "known_user": True,
                 "source": "personalized"} if u in ranked else
                {"user_id": u, "items": popular, "scores": [], "known_user": False, "source": "popular"}
                for u in user_ids]
