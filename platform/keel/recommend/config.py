"""The ``ecommerce_recommendations`` pipeline's config: one validated object, like :class:`keel.config.PipelineConfig`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from keel.config import PipelineConfigBase, RegisterConfig, ScoreShare
from keel.data.columns import ColumnNames
from keel.train.config import ScalingSpec


class InteractionColumns(ColumnNames):
    """A file's own names for the columns the stages read (MovieLens: ``user_id: userId``, ``item_id: movieId``)."""

    OPTIONAL = frozenset({"event"})

    user_id: str = "user_id"
    item_id: str = "item_id"
    timestamp: str = "timestamp"
    event: str | None = Field(default="event", description="view, cart or purchase; a file without it is read as "
                                                            "it is, and null ignores the column")
    rating: str | None = Field(default=None, description="explicit ratings (MovieLens: rating), read when named; "
                                                         "see min_rating")


class InteractionsConfig(BaseModel):
    """Where interactions come from: a file's column names, or the seeded generator of implicit feedback behind
    ``builtin://ecommerce_interactions`` (the rest of the fields)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    columns: InteractionColumns = InteractionColumns()
    min_rating: float | None = Field(default=None, description="keep only interactions rated at least this "
                                                               "(MovieLens: 4, what a user liked); needs "
                                                               "columns.rating")

    users: int = Field(default=5000, ge=10)
    items: int = Field(default=2000, ge=20)
    factors: int = Field(default=8, ge=1, description="latent taste dimensions behind the interactions")
    mean_interactions: float = Field(default=30.0, gt=1, description="per user, drawn log-normally")
    popularity_skew: float = Field(default=1.0, ge=0, description="Zipf exponent of item popularity")
    taste_strength: float = Field(default=3.0, ge=0, description="how much taste outweighs popularity")
    seed: int = 42

    @model_validator(mode="after")
    def _rating_column_named(self) -> InteractionsConfig:
        if self.min_rating is not None and self.columns.rating is None:
            raise ValueError("min_rating needs the ratings' column: set interactions.columns.rating (e.g. rating)")
        return self


class SplitConfig(BaseModel):
    """Each user's latest interactions are the test set; the one before them, validation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    holdout_per_user: int = Field(default=2, ge=1)
    min_train_interactions: int = Field(default=3, ge=1, description="users with fewer are trained on, not tested")


class RecommendTrainConfig(BaseModel):
    """Matrix factorization with a BPR loss on Ray Train."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    embedding_dim: int = Field(default=32, ge=1)
    learning_rate: float = Field(default=0.01, gt=0)
    weight_decay: float = Field(default=1e-5, ge=0, description="L2 on the embeddings in the batch")
    batch_size: int = Field(default=1024, ge=1)
    max_epochs: int = Field(default=30, ge=1)
    patience: int = Field(default=4, ge=1, description="epochs without a better validation NDCG before stopping")
    max_failures: int = Field(default=2, ge=0, description="worker failures to recover from checkpoints")
    seed: int = 42
    validation_users: int = Field(default=20_000, ge=1, description="users early stopping is judged on (a seeded "
                                  "sample when there are more); the test split is scored in full")
    sparse_gradients: bool | Literal["auto"] = Field(
        default="auto", description="sparse embedding gradients and SparseAdam (auto: from 10,000 users + items)")
    scaling: ScalingSpec = Field(default=ScalingSpec(use_gpu=False),
                                 description="Ray Train workers and CPUs each (auto: one worker, every CPU of a node)")

    @field_validator("scaling")
    @classmethod
    def _on_cpus(cls, scaling: ScalingSpec) -> ScalingSpec:
        """The BPR loop keeps its tensors on the CPU: a GPU worker would hold a GPU it never used."""
        if scaling.use_gpu is True:
            raise ValueError("the recommender trains on CPU workers; leave out use_gpu or set it to false")
        return scaling.model_copy(update={"use_gpu": False})


class RecommendEvaluateConfig(BaseModel):
    """Ranking metrics at ``k`` and the promotion gate on NDCG@k."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    k: int = Field(default=10, ge=1)
    tolerance: ScoreShare = Field(default=0.0, description="NDCG@k may be this much worse than the champion's")
    min_lift_over_popular: float = Field(default=1.0, ge=0, description="NDCG@k must be this multiple of the "
                                                                      "most-popular baseline's")


class RecommendPipelineConfig(PipelineConfigBase):
    """Every stage's settings for one ``ecommerce_recommendations`` run."""

    interactions: InteractionsConfig = InteractionsConfig()
    split: SplitConfig = SplitConfig()
    train: RecommendTrainConfig = RecommendTrainConfig()
    evaluate: RecommendEvaluateConfig = RecommendEvaluateConfig()
    registry: RegisterConfig
