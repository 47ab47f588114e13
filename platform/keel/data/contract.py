"""Data contracts: what a table must look like before a model may learn from it.

A contract is YAML, kept beside its pipeline and validated strictly, so a typo
in a field name is an error rather than a silently ignored rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from keel.errors import ConfigError, validation_problems

DType = Literal["float", "int", "bool", "category", "string"]
NUMERIC_DTYPES = ("float", "int", "bool")


class ColumnSpec(BaseModel):
    """One column's type, range and allowed values."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dtype: DType
    nullable: bool = False
    min: float | None = None
    max: float | None = None
    allowed: list[str | int | bool] | None = None

    @model_validator(mode="after")
    def _coherent(self) -> ColumnSpec:
        if (self.min is not None or self.max is not None) and self.dtype not in ("float", "int"):
            raise ValueError(f"min/max apply to float and int columns, not {self.dtype}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self

    @property
    def is_numeric(self) -> bool:
        return self.dtype in NUMERIC_DTYPES


class Thresholds(BaseModel):
    """How much imperfection the data may have before validation fails."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_rows: int = Field(default=1, ge=1)
    max_missing_fraction: float = Field(default=0.0, ge=0, le=1, description="per nullable column")
    max_out_of_range_fraction: float = Field(default=0.0, ge=0, le=1, description="per column")
    max_duplicate_fraction: float = Field(default=1.0, ge=0, le=1, description="of all rows")
    min_class_fraction: float = Field(default=0.0, ge=0, le=1, description="smallest target class share")


class DataContract(BaseModel):
    """Columns by name, the target column, and thresholds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    target: str
    columns: dict[str, ColumnSpec]
    thresholds: Thresholds = Thresholds()

    @model_validator(mode="after")
    def _target_is_a_column(self) -> DataContract:
        if self.target not in self.columns:
            raise ValueError(f"target {self.target!r} is not among the columns {sorted(self.columns)}")
        return self

    @property
    def features(self) -> list[str]:
        return [name for name in self.columns if name != self.target]


def parse_contract(payload: Any, origin: str) -> DataContract:
    """Validate a contract mapping; ``origin`` names the file or parameter it came from."""
    try:
        return DataContract.model_validate(payload)
    except ValidationError as e:
        raise ConfigError(f"{origin}: invalid data contract: {validation_problems(e, DataContract)}") from e


def load_contract(path: str | Path) -> DataContract:
    """Read and validate a contract YAML file."""
    try:
        payload = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: data contract file not found.") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e}).") from e
    return parse_contract(payload, str(path))
