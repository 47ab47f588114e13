"""The one exception family Keel raises for problems a user can fix.

Every message is a headline a person can act on: it names the file, field or
column at fault and says what to change. The CLI prints the headline and exits
1; anything that is not a ``KeelError`` is a bug and keeps its traceback.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError


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

    def __init__(self, uri: str, violations: list[str],
                 advice: str = "Fix the data, or relax the contract's thresholds if the data is right.") -> None:
        self.uri = uri
        self.violations = violations
        listed = "\n".join(f"  - {v}" for v in violations)
        super().__init__(f"{uri}: {len(violations)} data contract violation(s):\n{listed}\n{advice}")


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


class TrackingError(KeelError):
    """The MLflow tracking server does not answer."""


class ClusterError(KeelError):
    """The Kubernetes API, Kubeflow Pipelines or a Ray head could not be reached, or refused a request."""


def validation_problems(error: ValidationError, model: type[BaseModel] | None = None) -> str:
    """pydantic's errors as ``dotted.field: message``; a check over a whole model names its own fields, so it
    stands without a path, and a validator's message loses pydantic's "Value error, " prefix. Given the
    ``model`` that was validated, a misspelt field gets the nearest real one (``num_sample`` -> ``num_samples``)."""
    problems: list[str] = []
    union: tuple[tuple[Any, ...], Any, list[str]] | None = None  # a union field's path, value, each member's want
    for err in error.errors():
        message = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
        if err["type"] == "string_type" and isinstance(err.get("input"), bool):
            message += " (YAML reads yes, no, true, false, on and off unquoted as booleans: quote it, 'yes')"
        if err["type"] == "extra_forbidden" and model is not None:
            message += _did_you_mean(str(err["loc"][-1]), _fields_at(model, tuple(err["loc"][:-1])))
        loc = tuple(err["loc"])
        if loc and _UNION_MEMBER.match(str(loc[-1])):
            wanted = message.removeprefix("Input should be ").split(",")[0]
            if union is not None and union[0] == loc[:-1] and union[1] is err.get("input"):  # the same value
                union[2].append(wanted)
                problems[-1] = _union_problem(loc[:-1], err.get("input"), union[2])
                continue
            union = (loc[:-1], err.get("input"), [wanted])
        else:
            union = None
        path = ".".join(str(p) for p in loc)
        problems.append(f"{path}: {message}" if path else message)
    return "; ".join(problems)


# pydantic's tag for the member of a union that an error is about: int, constrained-int, literal['auto'], bool
_UNION_MEMBER = re.compile(r"^(int|float|str|bool|constrained-\w+|literal\[.*\]|\w+\[.*\])$")


def _union_problem(path: tuple[Any, ...], value: Any, wanted: list[str]) -> str:
    """One line for a value no member of a union field takes (``num_workers: int | "auto"``), where pydantic
    gives a line per member: ``num_workers.int: Input should be a valid integer; num_workers.literal['auto']:
    Input should be 'auto'``."""
    return f"{'.'.join(str(p) for p in path)}: {value!r} should be {' or '.join(wanted)}"


def _did_you_mean(name: str, fields: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fields_at(model: type[BaseModel], path: tuple[Any, ...]) -> list[str]:
    """The field names of the model found at ``path`` (an error's location) inside ``model``; [] if none is."""
    import typing

    from pydantic import BaseModel

    def nested(annotation: Any) -> Any:
        """The model a field holds: itself, inside Optional/Union, or the values of a dict or list."""
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation
        for argument in reversed(typing.get_args(annotation)):
            found = nested(argument)
            if found is not None:
                return found
        return None

    current: Any = model
    key_next = False  # after a dict or list field comes a key or an index, even one named like a field
    for part in path:
        if key_next or part not in current.model_fields:  # that, or a union member's tag
            key_next = False
            continue
        annotation = current.model_fields[part].annotation
        key_next = typing.get_origin(annotation) in (dict, list)
        current = nested(annotation)
        if current is None:
            return []
    return list(current.model_fields)
