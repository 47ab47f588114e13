"""Matrix factorization for implicit feedback, trained with Bayesian personalised ranking.

A user's score for an item is the dot product of their embeddings plus an
item bias (which learns popularity). BPR asks only that an item the user
interacted with outscores one they did not: the order is what a top-k list needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

WEIGHTS_FILE = "weights.pt"
SPEC_FILE = "model.json"
# Dense Adam steps every row of the embedding tables each batch, SparseAdam only the rows the batch touched.
# Measured on 2 cores at 32 dimensions and batches of 1,024: dense is faster below about 10,000 users + items
# (1.6x at the demo's 7,000), sparse above (1.3x at 14,000, 7-9x at MovieLens-20M's 165,000;
# tests/benchmarks/bench_recommend_scale.py).
SPARSE_FROM_ROWS = 10_000


class FactorizationSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    users: int
    items: int
    embedding_dim: int


def sparse_gradients(spec: FactorizationSpec, setting: bool | Literal["auto"]) -> bool:
    """Whether training's embeddings produce sparse gradients (``auto``: from :data:`SPARSE_FROM_ROWS` rows)."""
    return spec.users + spec.items >= SPARSE_FROM_ROWS if setting == "auto" else setting


class MatrixFactorization(nn.Module):
    def __init__(self, spec: FactorizationSpec, sparse: bool = False) -> None:
        super().__init__()
        self.user = nn.Embedding(spec.users, spec.embedding_dim, sparse=sparse)
        self.item = nn.Embedding(spec.items, spec.embedding_dim, sparse=sparse)
        self.item_bias = nn.Embedding(spec.items, 1, sparse=sparse)
        nn.init.normal_(self.user.weight, std=0.1)
        nn.init.normal_(self.item.weight, std=0.1)
        nn.init.zeros_(self.item_bias.weight)

    def forward(self, users: torch.Tensor, positives: torch.Tensor,
                negatives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BPR's two terms for a batch: each margin s(u, i+) - s(u, i-), and the embeddings' squared norm per row.

        The whole loss passes through ``forward`` because DistributedDataParallel
        averages the gradients of what went through its wrapper's forward only:
        a loss from the inner module's embeddings trains each worker on its own shard.
        """
        user, positive, negative = self.user(users), self.item(positives), self.item(negatives)
        bias = self.item_bias(positives) - self.item_bias(negatives)
        margin = (user * (positive - negative)).sum(-1) + bias.squeeze(-1)
        squared_norm = (user.pow(2).sum() + positive.pow(2).sum() + negative.pow(2).sum()) / len(users)
        return margin, squared_norm

    @torch.no_grad()
    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        """Every item's score for each user: (users, items), the bias added in the product's own pass."""
        return torch.addmm(self.item_bias.weight.T, self.user(users), self.item.weight.T)


def bpr_loss(model: nn.Module, users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
             weight_decay: float) -> torch.Tensor:
    """-log sigmoid(s(u, i+) - s(u, i-)), with L2 on the embeddings the batch touched.

    ``model`` is the :class:`MatrixFactorization` or its data-parallel wrapper: called, not unwrapped.
    """
    margin, squared_norm = model(users, positives, negatives)
    return -nn.functional.logsigmoid(margin).mean() + weight_decay * squared_norm


def bpr_optimizer(model: nn.Module, learning_rate: float, sparse: bool) -> torch.optim.Optimizer:
    """Adam, or for sparse gradients its lazy form: a step and moment update only for the rows a batch touched
    (rows a batch missed keep their place instead of drifting on momentum, the usual choice for embeddings)."""
    if sparse:
        return torch.optim.SparseAdam(list(model.parameters()), lr=learning_rate)
    return torch.optim.Adam(model.parameters(), lr=learning_rate)


class SeenPairs:
    """The (user, item) pairs of training, as sorted int64 keys ``user * items + item`` (also the held-out
    pairs that :func:`keel.recommend.metrics.ranking_metrics` checks the rankings against).

    Negative sampling asks whether a drawn item was one the user had seen. A
    dense users x items mask answers by indexing but needs a byte per possible
    pair: 3.7 GB for MovieLens-20M's 138k users and 27k items, on every Ray
    Train worker. The keys need 8 bytes per interaction (160 MB there), and a
    binary search per draw costs little next to the gradient step.
    """

    def __init__(self, users: torch.Tensor, items: torch.Tensor, item_count: int) -> None:
        self.item_count = item_count
        self.keys = torch.unique(users.long() * item_count + items.long())  # sorted

    def contains(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Whether each (user, item) pair is a training interaction."""
        keys = users.long() * self.item_count + items.long()
        if not len(self.keys):
            return torch.zeros(keys.shape, dtype=torch.bool)
        found = torch.searchsorted(self.keys, keys).clamp_(max=len(self.keys) - 1)
        return self.keys[found] == keys


def sample_negatives(users: torch.Tensor, seen: SeenPairs, generator: torch.Generator) -> torch.Tensor:
    """Uniform items; a draw the user had seen is redrawn once (rare with thousands of items)."""
    negatives = torch.randint(seen.item_count, users.shape, generator=generator)
    clash = seen.contains(users, negatives)
    if clash.any():
        negatives[clash] = torch.randint(seen.item_count, (int(clash.sum()),), generator=generator)
    return negatives


def save_factorization(model: MatrixFactorization, spec: FactorizationSpec, directory: Path) -> None:
    torch.save(model.state_dict(), directory / WEIGHTS_FILE)
    (directory / SPEC_FILE).write_text(spec.model_dump_json())


def load_factorization(directory: Path) -> MatrixFactorization:
    spec = FactorizationSpec.model_validate(json.loads((directory / SPEC_FILE).read_text()))
    model = MatrixFactorization(spec)
    model.load_state_dict(torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return model.eval()
