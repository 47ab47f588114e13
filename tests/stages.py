"""Build a run's stage outputs in-process, quickly, for tests of the later stages.

Training here is a few epochs of the real steps without Ray: the registry and
evaluation tests need a real model directory, not a Ray cluster.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import torch

from keel import storage
from keel.config import PipelineConfig, parse_pipeline_config
from keel.data.ingest import ingest
from keel.data.preprocess import LABEL, TRANSFORM_FILE, preprocess
from keel.evaluate import evaluate
from keel.recommend.model import FactorizationSpec, MatrixFactorization, save_factorization
from keel.recommend.recommender import Recommender
from keel.settings import KeelSettings
from keel.train.loop import train_epoch
from keel.train.model import MLPClassifier, MLPSpec, save_model
from tests.conftest import SMALL_CONTRACT, small_frame


def small_config(**sections: dict) -> PipelineConfig:
    return parse_pipeline_config({"pipeline": "small", "contract": SMALL_CONTRACT,
                                  "registry": {"model_name": "small-model"}, **sections}, "test config")


def train_quickly(splits_uri: str, output_uri: str, settings: KeelSettings, epochs: int = 30) -> None:
    splits = storage.read_manifest(splits_uri, settings)
    train = pd.read_parquet(splits["splits"]["train"])
    features = torch.tensor(train.drop(columns=[LABEL]).to_numpy())
    labels = torch.tensor(train[LABEL].to_numpy())
    torch.manual_seed(0)
    spec = MLPSpec(input_dim=features.shape[1], hidden_sizes=[8], num_classes=2)
    model = MLPClassifier(spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(epochs):
        train_epoch(model, optimizer, features, labels, 32, torch.Generator().manual_seed(0))
    with storage.staged_output(output_uri, "train", settings) as out:
        save_model(model, spec, out.dir)
        shutil.copyfile(splits["transform"], out.path(TRANSFORM_FILE))


def run_stages(settings: KeelSettings, run_id: str, source: Path, epochs: int = 30,
               config: PipelineConfig | None = None) -> dict[str, str]:
    """ingest -> preprocess -> quick train -> evaluate (gated against the registry's champion); the stage URIs."""
    config = config or small_config()
    uris = {stage: storage.stage_uri(settings, run_id, stage) for stage in
            ("ingest", "preprocess", "train", "evaluate", "register")}
    ingest(str(source), uris["ingest"], settings)
    preprocess(uris["ingest"], config.contract, config.preprocess, uris["preprocess"], settings)
    train_quickly(uris["preprocess"], uris["train"], settings, epochs)
    evaluate(uris["train"], uris["preprocess"], uris["evaluate"], settings, config.evaluate, config.registry)
    return uris


def write_small_source(directory: Path, rows: int = 200) -> Path:
    path = directory / "small.csv"
    small_frame(rows).to_csv(path, index=False)
    return path


def register_small_model(settings: KeelSettings, run_id: str, epochs: int = 30) -> dict[str, str]:
    """:func:`run_stages` on the small source, then register the model as a version of ``small-model``."""
    from keel.registry import register

    uris = run_stages(settings, run_id, write_small_source(settings.home.parent), epochs=epochs)
    register(uris["train"], uris["evaluate"], uris["ingest"], uris["preprocess"], small_config().registry, {},
             run_id, "small", uris["register"], settings)
    return uris


INTEGER_IDS = {"user_id": [10, 20, 30], "item_id": list(range(100, 106))}
TEXT_IDS = {"user_id": ["A1XK", "B07", "u-30"], "item_id": ["B0001", "B0002", "B0003", "SKU-4", "SKU-5", "SKU-6"]}
MIXED_IDS = {"user_id": TEXT_IDS["user_id"], "item_id": INTEGER_IDS["item_id"]}  # H&M: hex customers, int articles


def packaged_recommender(directory: Path, ids: dict[str, list] = INTEGER_IDS) -> Recommender:
    """Three users and six items under the given ids (rows 0..2 and 0..5): users 0 and 1 have seen items, user 2
    has none; popularity ranks item rows 2, 4, 1, 5."""
    spec = FactorizationSpec(users=3, items=6, embedding_dim=2)
    torch.manual_seed(0)
    directory.mkdir(parents=True, exist_ok=True)
    save_factorization(MatrixFactorization(spec), spec, directory)
    train = pd.DataFrame({"user_id": [0, 0, 1], "item_id": [0, 1, 2]})
    popularity = pd.DataFrame({"item_id": [4, 2, 5, 1], "count": [10, 30, 1, 5]})
    frames = {column: pd.DataFrame({"id": values}) for column, values in ids.items()}
    return Recommender.load(Recommender.package(directory, popularity, train, frames, directory / "package"))
