"""The one exception family Keel raises for problems a user can fix.

Every message is a headline a person can act on: it names the file, field or
column at fault and says what to change. The CLI prints the headline and exits
1; anything that is not a ``KeelError`` is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class KeelError(Exception):
    """A problem with input, configuration or environment that the user can fix."""

    @property
    def headline(self) -> str:
        return str(self)


class ConfigError(KeelError):
    """A setting, config file or pipeline parameter is invalid."""


class StorageError(KeelError):
    """An artifact or data URI cannot be read or written."""


class DataError(KeelError):
    """Input data cannot be parsed, or does not have the shape a stage needs."""


class DataContractError(DataError):
    """Data violates its contract beyond the contract's thresholds."""

    def __init__(self, uri: str, violations: list[str]) -> None:
        self.uri = uri
        self.violations = violations
        listed = "\n".join(f"  - {v}" for v in violations)
        super().__init__(
            f"{uri}: {len(violations)} data contract violation(s):\n{listed}\n"
            "Fix the data, or relax the contract's thresholds if the data is right."
        )


class TrainingError(KeelError):
    """Training could not run or did not produce a model."""


class RegistryError(KeelError):
    """The model registry refused an operation or holds no such model."""


class TuningError(KeelError):
    """A hyperparameter search could not produce a configuration."""


class CompressionError(KeelError):
    """No compressed variant satisfies the compression policy."""


class EvaluationError(KeelError):
    """The evaluation config does not fit the model or the test data."""


class ClusterError(KeelError):
    """The Kubernetes API, Kubeflow Pipelines or a Ray head could not be reached, or refused a request."""


def validation_problems(error: ValidationError) -> str:
    """pydantic's errors as ``dotted.field: message``; a check over a whole model names its own fields, so it
    stands without a path, and a validator's message loses pydantic's "Value error, " prefix."""
    problems = []
    for err in error.errors():
        message = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
        path = ".".join(str(p) for p in err["loc"])
        problems.append(f"{path}: {message}" if path else message)
    return "; ".join(problems)
