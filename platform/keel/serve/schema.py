"""Request and response models derived from the model's own input columns.

The request schema comes from the feature transform that travels with the
model, so the OpenAPI spec names every raw column with its type, and a
missing, extra or mistyped field is a 422 naming that field.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StrictBool, create_model

from keel.data.transform import FeatureTransform

MAX_RECORDS = 1024
FiniteNumber = Annotated[float, Field(strict=True, allow_inf_nan=False)]


def record_model(transform: FeatureTransform) -> type[BaseModel]:
    """One raw input row: numeric columns as finite JSON numbers, categorical as strings; null allowed.

    Strict numbers: ``true`` or ``"1.5"`` for a numeric column is a client's mistake, and a 422 says where,
    rather than a score of 1.0 or a guess; a column the contract types bool takes true/false as well as 0/1."""
    kinds: dict[str, Any] = {name: StrictBool | FiniteNumber | None if transform.may_be_boolean(name)
                             else FiniteNumber | None for name in transform.numeric}
    kinds.update({name: str | None for name in transform.categorical})
    # Each column is the alias of a field of a plain name: a column may be named as pydantic forbids a field
    # (`_flag`, `model_dump`, `model_config`), which failed the server at start-up after a run registered it.
    fields = {f"column_{i}": (kind, Field(..., alias=name)) for i, (name, kind) in enumerate(kinds.items())}
    return create_model("Record", __config__=ConfigDict(extra="forbid", serialize_by_alias=True),
                        **fields)  # type: ignore[call-overload]


def predict_request_model(transform: FeatureTransform) -> type[BaseModel]:
    """``{"records": [...]}``; KServe's V1 protocol (and MLflow's scoring server) send the same rows as
    ``instances``, so that key is read too (one of the two; both is a 422)."""
    record = record_model(transform)
    rows = Field(..., min_length=1, max_length=MAX_RECORDS, validation_alias=AliasChoices("records", "instances"),
                 description="input rows; also read from `instances` (KServe V1)")
    return create_model("PredictRequest", __config__=ConfigDict(extra="forbid"),
                        records=(list[record], rows))  # type: ignore[valid-type]


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]


class PredictResponse(BaseModel):
    model_name: str
    model_version: str
    request_id: str
    predictions: list[Prediction]


class V2Tensor(BaseModel):
    """An Open Inference Protocol tensor: one column of the request, or one output."""

    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int]
    datatype: str
    data: list[Any]
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    inputs: list[V2Tensor] = Field(..., min_length=1)
    outputs: list[dict[str, Any]] | None = None
    parameters: dict[str, Any] | None = None
