"""Pipeline configuration: one validated object per pipeline run.

A pipeline's ``config.yaml`` holds every stage's section; ``keel run --config``
deep-merges a user's file over it. Components receive the whole mapping and
each validates all of it, so a typo fails the first step, not the fifth.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from keel.data.contract import DataContract
from keel.data.preprocess import PreprocessConfig
from keel.errors import ConfigError
from keel.train.config import TrainConfig


class RegisterConfig(BaseModel):
    """Which registered model gets the new version, and how versions are compared."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    promotion_metric: str = "f1_macro"
    greater_is_better: bool = True


class PipelineConfig(BaseModel):
    """Every stage's settings for one pipeline run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pipeline: str
    contract: DataContract
    preprocess: PreprocessConfig = PreprocessConfig()
    train: TrainConfig = TrainConfig()
    registry: RegisterConfig

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, unset optional fields left out."""
        return json.dumps(self.model_dump(mode="json", exclude_none=True), sort_keys=True)


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
    try:
        payload = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: config file not found.") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e}).") from e
    if not isinstance(payload, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level.")
    if isinstance(payload.get("contract"), str):  # a contract file, relative to this config
        payload["contract"] = _read_yaml(path.parent / payload["contract"])
    return payload


def parse_pipeline_config(payload: dict[str, Any] | str, origin: str) -> PipelineConfig:
    """Validate a config mapping (or its JSON text); errors name ``origin`` and the dotted field path."""
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{origin}: not valid JSON ({e}).") from e
    try:
        return PipelineConfig.model_validate(payload)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{origin}: invalid pipeline config: {problems}") from e


def load_pipeline_config(path: Path, overrides: Path | None = None) -> PipelineConfig:
    """A pipeline's own config, with a user's override file merged over it."""
    payload = _read_yaml(path)
    origin = str(path)
    if overrides is not None:
        payload = deep_merge(payload, _read_yaml(overrides))
        origin = f"{overrides} (merged over {path})"
    return parse_pipeline_config(payload, origin)
