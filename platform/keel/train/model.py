"""The network: a plain MLP classifier, described by a JSON-serializable spec."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

WEIGHTS_FILE = "model.pt"
SPEC_FILE = "model.json"


class MLPSpec(BaseModel):
    """Everything needed to rebuild the network before loading its weights."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_dim: int
    hidden_sizes: list[int]
    num_classes: int
    dropout: float = 0.0
    quantized: bool = False  # dynamic int8 Linear layers (see :func:`quantize_int8`)
    quantize_min_weights: int = 0  # Linear layers with fewer weights stay float (0: none, as before this field)


class MLPClassifier(nn.Module):
    """Linear layers with ReLU and dropout; outputs logits."""

    def __init__(self, spec: MLPSpec) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = spec.input_dim
        for hidden in spec.hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(spec.dropout)]
            width = hidden
        layers.append(nn.Linear(width, spec.num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def quantize_int8(model: nn.Module, min_weights: int = 0) -> nn.Module:
    """Dynamic int8 quantization of the Linear layers with at least ``min_weights`` weights: int8 weights,
    activations quantized per call.

    A small layer (an MLP's output layer: hidden width x classes) saves a few
    kilobytes as int8 but pays the per-call activation quantization like any
    other, so it is faster, and no larger to speak of, left in float.
    ``torch.ao.quantization`` is deprecated in favour of torchao, which is not
    part of Keel's stack; its warnings are silenced here, where it is used.
    """
    import warnings

    from torch.ao.quantization import quantize_dynamic

    layers = {name for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and module.weight.numel() >= min_weights}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(model.eval(), layers, dtype=torch.qint8)


def save_model(model: nn.Module, spec: MLPSpec, directory: Path) -> None:
    """Weights as a state dict (never a pickled module) plus the spec as JSON."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / WEIGHTS_FILE)
    (directory / SPEC_FILE).write_text(spec.model_dump_json(indent=2))


def load_model(directory: Path) -> nn.Module:
    """Rebuild the network from its spec, quantize it when the spec says so, then load the weights."""
    import warnings

    spec = MLPSpec.model_validate(json.loads((directory / SPEC_FILE).read_text()))
    model: nn.Module = MLPClassifier(spec)
    if spec.quantized:
        model = quantize_int8(model, spec.quantize_min_weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors' deprecation notices
        model.load_state_dict(torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return model.eval()
