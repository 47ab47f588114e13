"""The ``customer_service_intents`` pipeline's config: one validated object, like :class:`keel.config.PipelineConfig`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from keel.config import PipelineConfigBase, RegisterConfig, ScoreShare
from keel.data.columns import ColumnNames
from keel.train.config import ScalingSpec


class UtteranceColumns(ColumnNames):
    """A file's own names for the columns the data step reads (Bitext's help-desk set: ``text: instruction``;
    Banking77: ``intent: label``)."""

    OPTIONAL = frozenset({"user_id", "split"})

    text: str = "text"
    intent: str = "intent"
    user_id: str | None = Field(default="user_id", description="pseudonymised; optional")
    split: str | None = Field(default="split", description="train or test per row; optional, else test_fraction")


class UtterancesConfig(BaseModel):
    """A file's column names, the seeded generator behind ``builtin://customer_service_utterances``, and the
    splits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    columns: UtteranceColumns = UtteranceColumns()

    per_intent: int = Field(default=240, ge=6, description="utterances per intent (14 intents)")
    typo_rate: float = Field(default=0.15, ge=0, le=1)
    validation_fraction: float = Field(default=0.1, gt=0, lt=0.5, description="of the training phrasings' rows")
    test_fraction: float = Field(default=0.2, gt=0, lt=0.5,
                                 description="a file source without a 'split' column: rows held out for testing")
    min_per_intent: int = Field(default=5, ge=1, description="a file source: fewest utterances of any intent")
    max_length: int = Field(default=40, ge=8, le=256, description="tokens per utterance after tokenization")
    seed: int = 42


class IntentTrainConfig(BaseModel):
    """Fine-tuning all-MiniLM-L6-v2 with a classification head on Ray Train."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    learning_rate: float = Field(default=5e-5, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    batch_size: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    max_epochs: int = Field(default=2, ge=1)
    patience: int = Field(default=1, ge=1, description="epochs without a lower validation loss before stopping")
    min_delta: float = Field(default=0.0, ge=0)
    max_failures: int = Field(default=2, ge=0, description="worker failures to recover from checkpoints")
    scaling: ScalingSpec = ScalingSpec()
    seed: int = 42


class IntentCompressConfig(BaseModel):
    """Variants of the fine-tuned model and the policy that picks the one to register."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    student_layers: int = Field(default=3, ge=1, le=5, description="transformer layers kept in the distilled student")
    distill_epochs: int = Field(default=2, ge=1)
    temperature: float = Field(default=2.0, gt=0)
    distill_weight: float = Field(default=0.5, ge=0, le=1, description="of the soft-target loss; the rest is CE")
    learning_rate: float = Field(default=5e-5, gt=0)
    max_f1_drop: ScoreShare = Field(default=0.02, ge=0,
                                    description="macro-F1 a variant may lose against the fine-tuned model")
    latency_repeats: int = Field(default=20, ge=3)


class IntentEvaluateConfig(BaseModel):
    """The gate: macro-F1 against the champion and against the bag-of-words baseline."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tolerance: ScoreShare = Field(default=0.01, ge=0, description="macro-F1 may be this much below the champion's")
    min_gain_over_baseline: float = Field(default=0.10, description="macro-F1 points above the bag-of-words baseline")


class IntentsPipelineConfig(PipelineConfigBase):
    """Every stage's settings for one ``customer_service_intents`` run."""

    utterances: UtterancesConfig = UtterancesConfig()
    train: IntentTrainConfig = IntentTrainConfig()
    compress: IntentCompressConfig = IntentCompressConfig()
    evaluate: IntentEvaluateConfig = IntentEvaluateConfig()
    registry: RegisterConfig
