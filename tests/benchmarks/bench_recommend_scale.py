"""The recommender at MovieLens-20M's shape: the data step, BPR steps, validation ranking, data parallelism.

A synthetic ratings file of MovieLens-20M's size (20M ratings, 138,493 users, 26,744 movies; Zipf item
popularity and user activity) goes through the data step with ``min_rating: 4``. Then, on what it keeps and
each against its baseline in the same run:

- BPR pairs/s with sparse gradients and SparseAdam against dense Adam (``sparse_pairs_per_s_ratio``), and
  the same at the demo's size, where ``auto`` keeps dense (``demo_sparse_pairs_per_s_ratio``, expected < 1);
- ranking 512 users' scores with ``torch.topk`` against NumPy's argpartition (``topk_speedup_ratio``) and
  validation NDCG@10 users/s over every validation user;
- the evaluate step's ranking metrics, a batch of users at a time, against the same user by user
  (``evaluate_model_speedup_ratio``, ``evaluate_popular_speedup_ratio``; both give the same NDCG@10);
- two data-parallel workers (gloo, one thread each) against one worker with both threads
  (``two_workers_pairs_per_s_ratio``: below 1 is why ``auto`` trains on one worker).

Prints one JSON report as its last line. About 3 minutes on 2 cores; peak memory about 3 GiB.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing

from keel.recommend.config import InteractionColumns, InteractionsConfig, SplitConfig
from keel.recommend.data import prepare
from keel.recommend.metrics import Scorer, popularity_scorer, ranking_metrics, seen_items, top_k
from keel.recommend.model import FactorizationSpec, MatrixFactorization, SeenPairs, bpr_optimizer
from keel.recommend.train import bpr_epoch, seen_pairs, validation_ndcg
from keel.settings import KeelSettings

REPO = Path(__file__).resolve().parents[2]
USERS, ITEMS, RATINGS = 138_493, 26_744, 20_000_263
DIM, BATCH, TIMED_PAIRS = 32, 1024, 409_600
STEP_CONFIG = {"batch_size": BATCH, "weight_decay": 1e-5}


def ratings_file(path: Path) -> None:
    """MovieLens-20M's size and skew: a few users rate thousands of movies, most a few dozen."""
    rng = np.random.default_rng(0)
    per_user = np.maximum(20, rng.zipf(1.6, USERS).clip(max=9000))
    per_user = (per_user * RATINGS / per_user.sum()).astype(int) + 1
    users = np.repeat(np.arange(USERS), per_user)[:RATINGS]
    popularity = 1 / np.arange(1, ITEMS + 1) ** 0.9
    items = rng.choice(ITEMS, size=len(users), p=popularity / popularity.sum())
    pd.DataFrame({"userId": users + 1, "movieId": items * 3 + 1,
                  "rating": rng.choice([1, 2, 3, 3.5, 4, 4.5, 5], len(users)),
                  "timestamp": rng.integers(800_000_000, 1_400_000_000, len(users))}).to_parquet(path, index=False)


def pairs_per_s(spec: FactorizationSpec, users: torch.Tensor, items: torch.Tensor, sparse: bool) -> float:
    torch.manual_seed(0)
    model = MatrixFactorization(spec, sparse=sparse)
    optimizer = bpr_optimizer(model, 0.01, sparse)
    started = time.perf_counter()
    bpr_epoch(model, optimizer, users, items, SeenPairs(users, items, spec.items), STEP_CONFIG,
              torch.Generator().manual_seed(0))
    return len(users) / (time.perf_counter() - started)


def random_pairs(spec: FactorizationSpec, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(spec.users, (count,), generator=generator),
            torch.randint(spec.items, (count,), generator=generator))


def _data_parallel_rank(rank: int, port: int, spec: FactorizationSpec, sparse: bool, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(MatrixFactorization(spec, sparse=sparse))
    users, items = random_pairs(spec, TIMED_PAIRS // 2, rank)
    optimizer = bpr_optimizer(model, 0.01, sparse)
    dist.barrier()
    started = time.perf_counter()
    bpr_epoch(model, optimizer, users, items, SeenPairs(users, items, spec.items), STEP_CONFIG,
              torch.Generator().manual_seed(rank))
    Path(f"{out}.{rank}").write_text(str(time.perf_counter() - started))
    dist.destroy_process_group()


def two_workers_pairs_per_s(spec: FactorizationSpec, sparse: bool, scratch: Path) -> float:
    from tests.integration.conftest import free_port

    torch.multiprocessing.spawn(_data_parallel_rank, args=(free_port(), spec, sparse, str(scratch / f"dp-{sparse}")),
                                nprocs=2)
    slowest = max(float((scratch / f"dp-{sparse}.{rank}").read_text()) for rank in (0, 1))
    return TIMED_PAIRS / slowest


def topk_speedup(spec: FactorizationSpec, repeats: int = 5) -> float:
    """Best of ``repeats`` each: the argpartition + argsort that ``top_k`` was, and ``top_k`` now."""
    torch.manual_seed(0)
    scores = MatrixFactorization(spec).score_all(torch.arange(512)).numpy().astype(np.float64)

    def argpartition() -> None:
        best = np.argpartition(-scores, 9, axis=1)[:, :10]
        np.take_along_axis(best, np.argsort(-np.take_along_axis(scores, best, axis=1), axis=1), axis=1)

    def best_seconds(ranking: Callable[[], object]) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            ranking()
            times.append(time.perf_counter() - started)
        return min(times)

    return best_seconds(argpartition) / best_seconds(lambda: top_k(scores, 10))


def ranking_user_by_user(score: Scorer, held_out: pd.DataFrame, seen: dict[int, np.ndarray], k: int,
                         items: int) -> float:
    """What ``ranking_metrics`` was before it worked a batch at a time (the baseline): float64 copies, each
    user's seen items masked and hits counted in Python. Returns NDCG@k."""
    relevant = {int(u): set(g.tolist()) for u, g in held_out.groupby("user_id")["item_id"]}
    users = np.array(sorted(relevant))
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ndcgs = []
    for start in range(0, len(users), 512):
        batch = users[start:start + 512]
        scores = np.array(score(batch), dtype=np.float64, copy=True)
        for row, user in enumerate(batch):
            scores[row, seen.get(int(user), [])] = -np.inf
        for user, ranked in zip(batch, top_k(scores, k)):
            hits = np.array([item in relevant[int(user)] for item in ranked.tolist()], dtype=np.float64)
            ndcgs.append(float((hits * discounts).sum() / discounts[:min(len(relevant[int(user)]), k)].sum()))
    return float(np.mean(ndcgs))


def ranking_speedups(spec: FactorizationSpec, train: pd.DataFrame, held_out: pd.DataFrame) -> dict[str, float]:
    """``ranking_metrics`` against the user-by-user baseline, on the same 10,240 users, for the model and for
    the popular list (whose rows are one broadcast vector, copied per batch)."""
    held_out = held_out[held_out["user_id"].isin(np.sort(held_out["user_id"].unique())[:10_240])]
    seen = seen_items(train)
    torch.manual_seed(0)
    model = MatrixFactorization(spec)
    counts = train["item_id"].value_counts()
    scorers = {"model": lambda users: model.score_all(torch.from_numpy(users)).numpy(),
               "popular": popularity_scorer(pd.DataFrame({"item_id": counts.index, "count": counts.to_numpy()}),
                                            spec.items)}
    report = {}
    for name, score in scorers.items():
        started = time.perf_counter()
        baseline = ranking_user_by_user(score, held_out, seen, 10, spec.items)
        middle = time.perf_counter()
        batched = ranking_metrics(score, held_out, seen, 10, spec.items)["ndcg_at_10"]
        ended = time.perf_counter()
        assert abs(batched - baseline) < 1e-6, (name, batched, baseline)  # the same ranking, only faster
        report[f"evaluate_{name}_users_per_s"] = round(10_240 / (ended - middle))
        report[f"evaluate_{name}_speedup_ratio"] = round((middle - started) / (ended - middle), 1)
    return report


def main() -> None:
    sys.path.insert(0, str(REPO))
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    report: dict[str, object] = {"benchmark": "recommend_scale"}
    with tempfile.TemporaryDirectory(prefix="keel-bench-recommend-") as scratch_dir:
        scratch = Path(scratch_dir)
        ratings_file(scratch / "ratings.parquet")
        columns = InteractionColumns(user_id="userId", item_id="movieId", rating="rating")
        started = time.perf_counter()
        manifest = prepare(str(scratch / "ratings.parquet"), InteractionsConfig(columns=columns, min_rating=4),
                           SplitConfig(), str(scratch / "splits"), KeelSettings(home=scratch / ".keel"))
        report.update(prepare_s=round(time.perf_counter() - started, 1), users=manifest["users"],
                      items=manifest["items"], interactions=manifest["rows"],
                      dense_mask_gib=round(manifest["users"] * manifest["items"] / 2**30, 2))
        train = pd.read_parquet(scratch / "splits" / "train.parquet")
        val = pd.read_parquet(scratch / "splits" / "val.parquet")
        spec = FactorizationSpec(users=manifest["users"], items=manifest["items"], embedding_dim=DIM)
        seen = seen_pairs(train, spec)
        report["seen_keys_mb"] = round(seen.keys.numel() * 8 / 2**20, 1)
        timed = train.sample(TIMED_PAIRS, random_state=0)
        users, items = (torch.tensor(timed[c].to_numpy()) for c in ("user_id", "item_id"))
        dense, sparse = pairs_per_s(spec, users, items, False), pairs_per_s(spec, users, items, True)
        demo = FactorizationSpec(users=5000, items=2000, embedding_dim=DIM)
        demo_pairs = random_pairs(demo, TIMED_PAIRS, 0)
        demo_dense, demo_sparse = pairs_per_s(demo, *demo_pairs, False), pairs_per_s(demo, *demo_pairs, True)
        report.update(dense_pairs_per_s=round(dense), sparse_pairs_per_s=round(sparse),
                      sparse_pairs_per_s_ratio=round(sparse / dense, 2),
                      epoch_s_dense=round(len(train) / dense), epoch_s_sparse=round(len(train) / sparse),
                      demo_sparse_pairs_per_s_ratio=round(demo_sparse / demo_dense, 2),
                      topk_speedup_ratio=round(topk_speedup(spec), 1))
        started = time.perf_counter()
        validation_ndcg(MatrixFactorization(spec), val, seen_items(train), 10)
        report["validation_users_per_s"] = round(val["user_id"].nunique() / (time.perf_counter() - started))
        report.update(ranking_speedups(spec, train, val))
        one_worker = pairs_per_s(spec, *random_pairs(spec, TIMED_PAIRS, 0), True)
        report["two_workers_pairs_per_s_ratio"] = round(two_workers_pairs_per_s(spec, True, scratch) / one_worker, 2)
    report["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(json.dumps(report), file=sys.stdout)


if __name__ == "__main__":
    main()
