"""Pipeline configuration: one validated object per pipeline run.

A pipeline's ``config.yaml`` holds every stage's section; ``keel run --config``
deep-merges a user's file over it. Components receive the whole mapping and
each validates all of it, so a typo fails the first step, not the fifth.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from keel.data.contract import DataContract
from keel.data.preprocess import PreprocessConfig
from keel.errors import ConfigError, validation_problems
from keel.resources import DEFAULT_STEP_RESOURCES, StepResources, resources_for, unknown_steps
from keel.train.config import TrainConfig

if TYPE_CHECKING:
    from keel.batch import BatchScoringConfig
    from keel.intents.config import IntentsPipelineConfig
    from keel.monitor.performance import PerformanceCheckConfig
    from keel.recommend.config import RecommendPipelineConfig


MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # a registered model's name, as MLflow's registry takes it


def _within_a_score(value: float) -> float:
    """Drops and tolerances are in the metric's own units, a score between 0 and 1: a 5 meant as five points
    would let any model through."""
    if abs(value) > 1:
        raise ValueError(f"{value:g} is more than a whole score: give a share of a score between 0 and 1 "
                         "(0.01 is one point)")
    return value


# a drop or tolerance in a score between 0 and 1 (accuracy, F1, NDCG@k)
ScoreShare = Annotated[float, AfterValidator(_within_a_score)]


class RegisterConfig(BaseModel):
    """Which registered model gets the new version, and how versions are compared."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str = Field(min_length=1, pattern=MODEL_NAME_PATTERN)
    promotion_metric: str = "f1_macro"
    greater_is_better: bool = True
    approval: Literal["gate", "manual"] = Field(
        default="gate", description="gate: a version that passes the gate becomes champion; manual: it stays "
                                    "challenger, awaiting approval, until a person runs `keel models promote`")
    preview: Literal["shadow", "canary"] = Field(
        default="shadow", description="with approval: manual and serve=true, how a version awaiting approval meets "
                                      "live traffic: shadow (scores a copy, answers nobody) or canary (answers "
                                      "canary_weight of the requests)")
    canary_weight: float = Field(default=0.1, gt=0, lt=1, description="share of requests a canary preview answers")


TUNABLE_FIELDS = ("hidden_sizes", "dropout", "learning_rate", "weight_decay", "batch_size")


class SearchDimension(BaseModel):
    """One hyperparameter's range: ``loguniform``/``uniform`` over [low, high], or a ``choice`` of values."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["loguniform", "uniform", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _bounds_or_values(self) -> SearchDimension:
        if self.type == "choice":
            if not self.values:
                raise ValueError("a choice needs a non-empty `values` list")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a {self.type} range needs `low` < `high`")
        elif self.type == "loguniform" and self.low <= 0:
            raise ValueError("a loguniform range needs `low` > 0")
        return self


class TuneConfig(BaseModel):
    """Ray Tune search before the final training run; ``num_samples: 0`` trains the config as written."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_samples: int = Field(default=0, ge=0, description="trials; 0 skips tuning")
    max_epochs: int = Field(default=30, ge=1, description="epochs a trial may run (ASHA's max_t)")
    grace_period: int = Field(default=3, ge=1, description="epochs every trial gets before ASHA may stop it")
    reduction_factor: int = Field(default=3, ge=2)
    metric: Literal["val_loss", "val_accuracy"] = "val_loss"
    max_concurrent_trials: PositiveInt | Literal["auto"] = Field(
        default="auto", description="auto: one trial per CPU, or per GPU where Ray has GPUs")
    seed: int = Field(default=42, description="seeds TPE and each trial's training; a search repeats exactly only "
                                              "with max_concurrent_trials: 1 (concurrent trials report in any order)")
    search_space: dict[str, SearchDimension] = {}

    @model_validator(mode="after")
    def _tunable_keys(self) -> TuneConfig:
        unknown = sorted(set(self.search_space) - set(TUNABLE_FIELDS))
        if unknown:
            raise ValueError(f"search_space keys {unknown} are not tunable; use some of {list(TUNABLE_FIELDS)}")
        if self.num_samples and not self.search_space:
            raise ValueError("num_samples > 0 needs a search_space")
        problems = [problem for name in sorted(self.search_space)
                    if (problem := _outside_train_field(name, self.search_space[name]))]
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _outside_train_field(name: str, dim: SearchDimension) -> str:
    """Why a dimension could sample a value the train section rejects ('' when it can't), so a bad range fails
    when the config is read instead of in the first trial that draws from it, minutes into the run."""
    kind = TrainConfig.model_fields[name].annotation
    if dim.type != "choice" and kind is not float:
        what = "a whole number, and a range samples fractions" if kind is int else "not a single number"
        return f"search_space.{name}: train.{name} is {what}; use a choice of values"
    ends = dim.values if dim.type == "choice" else [dim.low, dim.high]
    for value in ends or []:
        try:
            TrainConfig.model_validate({name: value})
        except ValidationError as e:
            label = "value" if dim.type == "choice" else ("low" if value == dim.low else "high")
            return f"search_space.{name}: {label} {value!r} is not a valid train.{name} ({e.errors()[0]['msg']})"
    return ""


CompressionMethod = Literal["prune_unstructured", "prune_structured", "int8", "distill"]
COMPRESSION_METHODS: tuple[CompressionMethod, ...] = ("prune_unstructured", "prune_structured", "int8", "distill")


class CompressConfig(BaseModel):
    """Which compressed variants to build, and the policy that picks the one to register."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    methods: list[CompressionMethod] = list(COMPRESSION_METHODS)
    prune_amount: float = Field(default=0.5, gt=0, lt=1, description="share of weights zeroed (unstructured)")
    keep_units: float = Field(default=0.5, gt=0, lt=1, description="share of hidden units kept (structured)")
    finetune_epochs: int = Field(default=10, ge=0)
    int8_min_layer_weights: int = Field(default=4096, ge=0, description="smaller Linear layers stay float in the "
                                        "int8 variant: quantizing them saves a few KB and costs time per call")
    student_hidden_sizes: list[PositiveInt] | None = Field(default=None, min_length=1,
                                                           description="default: a quarter of the teacher's")
    temperature: float = Field(default=4.0, gt=0)
    distill_alpha: float = Field(default=0.7, ge=0, le=1, description="weight of the soft-target loss")
    distill_epochs: int = Field(default=60, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    max_accuracy_drop: ScoreShare = Field(default=0.01, ge=0)
    latency_budget_ms: float = Field(default=10.0, gt=0)
    policy_batch_size: Literal[1, 32] = 1
    latency_repeats: int = Field(default=200, ge=10)
    seed: int = 42


class SliceSpec(BaseModel):
    """Rows grouped by a raw column: numeric ``bins`` edges make bands, no bins means one slice per value."""

    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)  # a column named 2024

    column: str = Field(min_length=1)
    bins: list[float] | None = Field(default=None, min_length=2)

    @model_validator(mode="after")
    def _increasing(self) -> SliceSpec:
        if self.bins is not None and any(b <= a for a, b in zip(self.bins, self.bins[1:])):
            raise ValueError("bins must be strictly increasing")
        return self


class GateConfig(BaseModel):
    """When a challenger may replace the champion."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tolerance: ScoreShare = Field(default=0.0, description="overall metric may be this much worse than the champion's")
    slice_tolerance: ScoreShare = Field(default=0.05, ge=0)
    max_demographic_parity_difference: float | None = Field(
        default=None, ge=0, le=1, description="bound over each slice column; null: reported, not bounded")
    max_equalized_odds_difference: float | None = Field(
        default=None, ge=0, le=1, description="bound over each slice column; null: reported, not bounded")
    allow_schema_changes: bool = Field(
        default=False, description="let the gate promote a model that reads other columns or predicts other "
                                   "classes than the champion; false: such a model waits for `keel models "
                                   "promote`, since every caller of the served model must change first")


class EvaluateConfig(BaseModel):
    """Slices, fairness and the promotion gate."""

    # `positive_class: 1` for 0/1 labels, as YAML reads an unquoted 1
    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)

    slices: list[SliceSpec] = []
    positive_class: str | None = Field(default=None, description="for fairness measures; default the second class")
    min_slice_rows: int = Field(default=10, ge=1, description="smaller slices are reported, not gated")
    gate: GateConfig = GateConfig()


class PipelineConfigBase(BaseModel):
    """What every pipeline kind's config has: its pipeline's name, and one canonical JSON form (the compiled
    YAML's ``config`` default, and what each step parses back)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pipeline: str
    resources: dict[str, StepResources] = Field(
        default={}, description="per step (its name in the Kubeflow UI): requests and limits over Keel's defaults "
                                "(keel.resources); fixed when the pipeline is compiled")

    @model_validator(mode="after")
    def _resources_fit_known_steps(self) -> PipelineConfigBase:
        unknown = unknown_steps(self.resources)
        if unknown:
            raise ValueError(f"resources: no step named {', '.join(map(repr, unknown))}; steps are "
                             f"{sorted(DEFAULT_STEP_RESOURCES)}")
        for name in self.resources:
            try:
                resources_for(name, self.resources)
            except ValidationError as e:
                raise ValueError(f"resources.{name}: with Keel's defaults for the rest, "
                                 f"{e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
        return self

    def step_resources(self, step: str) -> StepResources:
        """What the step's pod requests and may use: Keel's defaults with this config's ``resources`` merged."""
        return resources_for(step, self.resources)

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, unset optional fields left out; ``resources`` too, which the compiled
        pipeline's pods already carry and no step reads."""
        return json.dumps(self.model_dump(mode="json", exclude_none=True, exclude={"resources"}), sort_keys=True)


class PipelineConfig(PipelineConfigBase):
    """Every stage's settings for one pipeline run."""

    contract: DataContract
    preprocess: PreprocessConfig = PreprocessConfig()
    tune: TuneConfig = TuneConfig()
    train: TrainConfig = TrainConfig()
    compress: CompressConfig = CompressConfig(methods=[])
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegisterConfig

    @model_validator(mode="after")
    def _evaluation_fits_the_contract(self) -> PipelineConfig:
        """Evaluation slices the raw test rows by contract columns (preprocess keeps no others) and names a
        target class; what the contract already rules out fails here, not in the evaluate step after training."""
        columns = self.contract.columns
        allowed = columns[self.contract.target].allowed
        positive = self.evaluate.positive_class
        if positive is not None and allowed is not None and positive not in [str(value) for value in allowed]:
            raise ValueError(f"evaluate.positive_class: {positive!r} is not one of the target "
                             f"{self.contract.target!r}'s allowed values {allowed}")
        for index, spec in enumerate(self.evaluate.slices):
            where = f"evaluate.slices.{index}.column"
            if spec.column not in columns:
                raise ValueError(f"{where}: {spec.column!r} is not a contract column; use one of {sorted(columns)}")
            if spec.bins is not None and not columns[spec.column].is_numeric:
                raise ValueError(f"{where}: {spec.column!r} is a {columns[spec.column].dtype} column, so it has "
                                 "no `bins` bands; leave bins out to slice by its values")
        return self


# Each pipeline kind validates its own sections; all carry ``pipeline`` and ``to_json``, the training ones
# ``registry`` too.
AnyPipelineConfig = Union[PipelineConfig, "RecommendPipelineConfig", "IntentsPipelineConfig", "BatchScoringConfig",
                          "PerformanceCheckConfig"]


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` wins key by key; nested mappings merge instead of being replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    """A config file's mapping, with a ``contract: FILE`` (relative to it) read in."""
    return _with_contract_file(_read_mapping(path), path)


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        payload = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: config file not found.") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e}).") from e
    if not isinstance(payload, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level.")
    return payload


def _with_contract_file(payload: dict[str, Any], path: Path) -> dict[str, Any]:
    if isinstance(payload.get("contract"), str):  # a contract file, relative to this config
        payload["contract"] = _read_mapping(path.parent / payload["contract"])
    return payload


def config_class(payload: dict[str, Any]) -> type[PipelineConfig] | type[RecommendPipelineConfig] | \
        type[IntentsPipelineConfig] | type[BatchScoringConfig] | type[PerformanceCheckConfig]:
    """The config model of the pipeline the payload names: each pipeline kind has its own sections."""
    if payload.get("pipeline") == "batch_scoring":
        from keel.batch import BatchScoringConfig

        return BatchScoringConfig
    if payload.get("pipeline") == "model_performance":
        from keel.monitor.performance import PerformanceCheckConfig

        return PerformanceCheckConfig
    if payload.get("pipeline") == "ecommerce_recommendations":
        from keel.recommend.config import RecommendPipelineConfig

        return RecommendPipelineConfig
    if payload.get("pipeline") == "customer_service_intents":
        from keel.intents.config import IntentsPipelineConfig

        return IntentsPipelineConfig
    return PipelineConfig


def parse_pipeline_config(payload: dict[str, Any] | str, origin: str) -> AnyPipelineConfig:
    """Validate a config mapping (or its JSON text); errors name ``origin`` and the dotted field path."""
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{origin}: not valid JSON ({e}).") from e
    if not isinstance(payload, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections at the top level.")
    model = config_class(payload)
    try:
        return model.model_validate(payload)
    except ValidationError as e:
        raise ConfigError(f"{origin}: invalid pipeline config: {validation_problems(e, model)}") from e


def load_pipeline_config(path: Path, overrides: Path | None = None) -> AnyPipelineConfig:
    """A pipeline's own config, with a user's override file merged over it. An inline ``contract:`` mapping
    merges too (to relax a threshold); ``contract: FILE`` is another table's contract and replaces it."""
    payload = _read_yaml(path)
    origin = str(path)
    if overrides is not None:
        override = _read_mapping(overrides)
        replaces_contract = isinstance(override.get("contract"), str)  # another table's: it replaces, whole
        override = _with_contract_file(override, overrides)
        payload = deep_merge(payload, override)
        if replaces_contract:
            payload["contract"] = override["contract"]
        origin = f"{overrides} (merged over {path})"
    return parse_pipeline_config(payload, origin)
