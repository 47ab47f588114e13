"""Top-k ranking metrics over held-out interactions, and the most-popular baseline.

Items a user already interacted with in training are never recommended back:
they are masked before ranking, for the model and the baseline alike.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from keel.recommend.model import SeenPairs

# user rows -> (users, items) scores, items by row. The array is the caller's to overwrite (seen items are
# masked in place): a scorer returns a fresh array, or a read-only view, which the caller copies.
Scorer = Callable[[np.ndarray], np.ndarray]
# Users are scored a batch at a time: at most this many (user, item) scores in memory (64 MiB as float32).
SCORE_BATCH_CELLS = 1 << 24
_NONE = np.empty(0, dtype=np.int64)


def seen_items(train: pd.DataFrame) -> dict[int, np.ndarray]:
    """Each user's training items, to mask out of their rankings."""
    return {int(user): group.to_numpy() for user, group in train.groupby("user_id")["item_id"]}


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` best scores per row, best first (order among equal scores unspecified).

    ``torch.topk``: 7-15x NumPy's argpartition on 512 users x 27,000 items (bench_recommend_scale.py), the cost
    that bounded evaluation.
    """
    k = min(k, scores.shape[1])
    return torch.topk(torch.from_numpy(scores), k, dim=1, sorted=True).indices.numpy()


def ranking_metrics(score: Scorer, held_out: pd.DataFrame, seen: dict[int, np.ndarray], k: int,
                    items: int) -> dict[str, float]:
    """Recall@k and NDCG@k (binary relevance) averaged over the users with held-out items.

    ``items``, the catalogue's size, sizes the batches of users scored at once. A batch is masked, ranked and
    checked against the held-out pairs in whole arrays: user by user in Python, with float64 copies, the
    evaluate step took 54 s at MovieLens-20M's shape (138k test users), 115 s with a champion to rescore.
    """
    batch_users = max(1, min(512, SCORE_BATCH_CELLS // max(items, 1)))
    relevant = SeenPairs(torch.tensor(held_out["user_id"].to_numpy()), torch.tensor(held_out["item_id"].to_numpy()),
                         items)
    users, relevant_counts = np.unique((relevant.keys // items).numpy(), return_counts=True)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.cumsum(discounts)[np.minimum(relevant_counts, k) - 1]
    recalls, ndcgs = np.empty(len(users)), np.empty(len(users))
    for start in range(0, len(users), batch_users):
        batch = slice(start, start + batch_users)
        ranked = top_k_unseen(score(users[batch]), users[batch], seen, k)
        hits = relevant.contains(torch.from_numpy(users[batch, None]), torch.from_numpy(ranked)).numpy() & (ranked >= 0)
        recalls[batch] = hits.sum(axis=1) / relevant_counts[batch]
        ndcgs[batch] = (hits * discounts[:ranked.shape[1]]).sum(axis=1) / ideal[batch]
    return {f"recall_at_{k}": float(recalls.mean()) if len(users) else float("nan"),
            f"ndcg_at_{k}": float(ndcgs.mean()) if len(users) else float("nan"),
            "users_evaluated": float(len(users))}


def top_k_unseen(scores: np.ndarray, users: np.ndarray, seen: dict[int, np.ndarray], k: int) -> np.ndarray:
    """Each row's ``k`` best items its user has not seen, best first; -1 past the last unseen item.

    Seen items are set to -inf in ``scores`` (in place when it is a writable, row-major float32 array),
    so ``scores`` then holds what was ranked.
    """
    table = scores if scores.flags.writeable and scores.flags.c_contiguous and scores.dtype == np.float32 \
        else np.array(scores, dtype=np.float32, order="C")  # row-major: topk along a column-major row took 5x
    masked = [seen.get(int(user), _NONE) for user in users.tolist()]
    lengths = np.fromiter((len(items) for items in masked), dtype=np.int64, count=len(masked))
    if lengths.sum():
        table[np.repeat(np.arange(len(users)), lengths), np.concatenate(masked)] = -np.inf
    best = top_k(table, k)
    best[np.isneginf(np.take_along_axis(table, best, axis=1))] = -1
    return best


def popularity_scorer(popularity: pd.DataFrame, items: int) -> Scorer:
    """The same most-popular ranking for every user (training counts)."""
    counts = np.zeros(items, dtype=np.float32)
    counts[popularity["item_id"].to_numpy()] = popularity["count"].to_numpy()
    return lambda users: np.broadcast_to(counts, (len(users), items))
