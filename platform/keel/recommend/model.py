"""Matrix factorization for implicit feedback, trained with Bayesian personalised ranking.

A user's score for an item is the dot product of their embeddings plus an
item bias (which learns popularity). BPR asks only that an item the user
interacted with outscores one they did not: the order is what a top-k list needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

WEIGHTS_FILE = "weights.pt"
SPEC_FILE = "model.json"


class FactorizationSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    users: int
    items: int
    embedding_dim: int


class MatrixFactorization(nn.Module):
    def __init__(self, spec: FactorizationSpec) -> None:
        super().__init__()
        self.user = nn.Embedding(spec.users, spec.embedding_dim)
        self.item = nn.Embedding(spec.items, spec.embedding_dim)
        self.item_bias = nn.Embedding(spec.items, 1)
        nn.init.normal_(self.user.weight, std=0.1)
        nn.init.normal_(self.item.weight, std=0.1)
        nn.init.zeros_(self.item_bias.weight)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores of matching (user, item) pairs."""
        return (self.user(users) * self.item(items)).sum(-1) + self.item_bias(items).squeeze(-1)

    @torch.no_grad()
    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        """Every item's score for each user: (users, items)."""
        return self.user(users) @ self.item.weight.T + self.item_bias.weight.T


def bpr_loss(model: MatrixFactorization, users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
             weight_decay: float) -> torch.Tensor:
    """-log sigmoid(s(u, i+) - s(u, i-)), with L2 on the embeddings the batch touched."""
    margin = model(users, positives) - model(users, negatives)
    touched = (model.user(users).pow(2).sum() + model.item(positives).pow(2).sum()
               + model.item(negatives).pow(2).sum()) / len(users)
    return -nn.functional.logsigmoid(margin).mean() + weight_decay * touched


def sample_negatives(users: torch.Tensor, seen: torch.Tensor, items: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform items; a draw the user had seen is redrawn once (rare with thousands of items)."""
    negatives = torch.randint(items, users.shape, generator=generator)
    clash = seen[users, negatives]
    if clash.any():
        negatives[clash] = torch.randint(items, (int(clash.sum()),), generator=generator)
    return negatives


def save_factorization(model: MatrixFactorization, spec: FactorizationSpec, directory: Path) -> None:
    torch.save(model.state_dict(), directory / WEIGHTS_FILE)
    (directory / SPEC_FILE).write_text(spec.model_dump_json())


def load_factorization(directory: Path) -> MatrixFactorization:
    spec = FactorizationSpec.model_validate(json.loads((directory / SPEC_FILE).read_text()))
    model = MatrixFactorization(spec)
    model.load_state_dict(torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return model.eval()
