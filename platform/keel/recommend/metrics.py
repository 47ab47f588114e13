"""Top-k ranking metrics over held-out interactions, and the most-popular baseline.

Items a user already interacted with in training are never recommended back:
they are masked before ranking, for the model and the baseline alike.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

Scorer = Callable[[np.ndarray], np.ndarray]  # user rows -> (users, items) scores, items by row
# Users are scored a batch at a time: at most this many (user, item) scores in memory (128 MiB as float64).
SCORE_BATCH_CELLS = 1 << 24


def seen_items(train: pd.DataFrame) -> dict[int, np.ndarray]:
    """Each user's training items, to mask out of their rankings."""
    return {int(user): group.to_numpy() for user, group in train.groupby("user_id")["item_id"]}


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` best scores per row, best first (order among equal scores unspecified).

    ``torch.topk``: 15x NumPy's argpartition on 512 users x 27,000 items (bench_recommend_scale.py), the cost
    that bounded evaluation.
    """
    k = min(k, scores.shape[1])
    return torch.topk(torch.from_numpy(scores), k, dim=1, sorted=True).indices.numpy()


def ranking_metrics(score: Scorer, held_out: pd.DataFrame, seen: dict[int, np.ndarray], k: int,
                    items: int) -> dict[str, float]:
    """Recall@k and NDCG@k (binary relevance) averaged over the users with held-out items.

    ``items``, the catalogue's size, sizes the batches of users scored at once.
    """
    batch_users = max(1, min(512, SCORE_BATCH_CELLS // max(items, 1)))
    relevant = {int(u): set(g.tolist()) for u, g in held_out.groupby("user_id")["item_id"]}
    users = np.array(sorted(relevant))
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    recalls, ndcgs = [], []
    for start in range(0, len(users), batch_users):
        batch = users[start:start + batch_users]
        scores = np.array(score(batch), dtype=np.float64, copy=True)
        for row, user in enumerate(batch):
            scores[row, seen.get(int(user), [])] = -np.inf
        for user, ranked in zip(batch, top_k(scores, k)):
            truth = relevant[int(user)]
            hits = np.array([item in truth for item in ranked.tolist()], dtype=np.float64)
            recalls.append(hits.sum() / len(truth))
            ideal = discounts[:min(len(truth), k)].sum()
            ndcgs.append(float((hits * discounts[:len(hits)]).sum() / ideal))
    return {f"recall_at_{k}": float(np.mean(recalls)), f"ndcg_at_{k}": float(np.mean(ndcgs)),
            "users_evaluated": float(len(users))}


def popularity_scorer(popularity: pd.DataFrame, items: int) -> Scorer:
    """The same most-popular ranking for every user (training counts)."""
    counts = np.zeros(items, dtype=np.float64)
    counts[popularity["item_id"].to_numpy()] = popularity["count"].to_numpy()
    return lambda users: np.broadcast_to(counts, (len(users), items))
