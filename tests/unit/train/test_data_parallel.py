"""Every model Keel trains, in DistributedDataParallel as Ray Train's ``prepare_model`` wraps it on more than one
worker: two ranks of a gloo process group, each stepping on its own half of the rows.

DDP averages gradients only of what passes through the wrapper's forward, and fails a step when a parameter
got no gradient in the one before. Both passed silently on one worker, which is all a 2-core machine picks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing
from torch import nn

from keel.train.loop import train_epoch
from tests.integration.conftest import free_port

STEPS_ROWS = 64  # each rank's rows: two steps of 32


def _tabular() -> tuple[nn.Module, Callable[[nn.Module, torch.optim.Optimizer, int], None]]:
    from keel.train.model import MLPClassifier, MLPSpec

    model = MLPClassifier(MLPSpec(input_dim=6, hidden_sizes=[16, 8], num_classes=3, dropout=0.1))

    def step(wrapped: nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> None:
        rows = torch.Generator().manual_seed(rank)
        features, labels = torch.randn(STEPS_ROWS, 6, generator=rows), torch.randint(3, (STEPS_ROWS,), generator=rows)
        train_epoch(wrapped, optimizer, features, labels, 32, rows)
    return model, step


def _recommender(sparse: bool = False) -> tuple[nn.Module, Callable[[nn.Module, torch.optim.Optimizer, int], None]]:
    from keel.recommend.model import FactorizationSpec, MatrixFactorization, SeenPairs
    from keel.recommend.train import bpr_epoch

    model = MatrixFactorization(FactorizationSpec(users=40, items=30, embedding_dim=8), sparse=sparse)

    def step(wrapped: nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> None:
        rows = torch.Generator().manual_seed(rank)
        users = torch.randint(40, (STEPS_ROWS,), generator=rows)
        items = torch.randint(30, (STEPS_ROWS,), generator=rows)
        bpr_epoch(wrapped, optimizer, users, items, SeenPairs(users, items, 30),
                  {"batch_size": 32, "weight_decay": 0.01}, rows)
    return model, step


def _intents() -> tuple[nn.Module, Callable[[nn.Module, torch.optim.Optimizer, int], None]]:
    from keel.intents.model import IntentSpec, pretrained_classifier

    model = pretrained_classifier(IntentSpec(labels=["billing", "refund", "shipping"], layers=2, max_length=16))

    def step(wrapped: nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> None:
        rows = torch.Generator().manual_seed(rank)
        tokens = torch.stack([torch.randint(1000, 5000, (STEPS_ROWS, 16), generator=rows),
                              torch.ones(STEPS_ROWS, 16, dtype=torch.long)], dim=1)
        train_epoch(wrapped, optimizer, tokens, torch.randint(3, (STEPS_ROWS,), generator=rows), 32, rows)
    return model, step


FAMILIES = {"tabular": _tabular, "recommender": _recommender, "recommender_sparse": lambda: _recommender(sparse=True),
            "intents": _intents}


def _rank(rank: int, port: int, family: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same initial weights on both ranks, as prepare_model's broadcast leaves them
    torch.set_num_threads(1)
    model, step = FAMILIES[family]()
    wrapped = nn.parallel.DistributedDataParallel(model)
    step(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), rank)
    torch.save(model.state_dict(), f"{out}.{rank}")
    # Both ranks past their last collective before either tears gloo down: a rank that destroyed the group
    # while the other's sparse all-reduce was still being answered aborted it (SIGABRT, "terminate called
    # without an active exception"), about one run in four here.
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_data_parallel_workers_train_one_model(family: str, tmp_path: Path) -> None:
    """Two steps on different rows; both ranks must end with the same weights, and every weight must train."""
    torch.multiprocessing.spawn(_rank, args=(free_port(), family, str(tmp_path / "weights")), nprocs=2)
    first, second = (torch.load(tmp_path / f"weights.{rank}", weights_only=True) for rank in (0, 1))
    torch.manual_seed(0)
    initial, _ = FAMILIES[family]()
    for name, before in initial.state_dict().items():
        if before.is_floating_point() and name.endswith(("weight", "bias")):
            assert not torch.equal(first[name], before), f"{name} did not train"
        assert torch.equal(first[name], second[name]), f"{name} differs between the workers"
