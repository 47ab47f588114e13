"""Fine-tune all-MiniLM-L6-v2 with a classification head on Ray Train.

The worker loop is :mod:`keel.train.loop`'s own (epochs, early stopping on
validation loss, a checkpoint every epoch, resume after a failure): the
classifier takes one packed token tensor, so the generic steps drive it. Only
reading the token shards and building the pretrained network are specific.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from keel import storage
from keel.intents.config import IntentTrainConfig
from keel.intents.model import IntentSpec, classifier_shape, pretrained_classifier, pretrained_dir, save_intent_model
from keel.intents.prepare import tokenizer_of
from keel.settings import KeelSettings
from keel.train.loop import TrainState, evaluate_epoch, fit_epochs, restore
from keel.train.scaling import cluster_scaling
from keel.train.ingest import read_splits, worker_batches
from keel.train.trainer import build_trainer, final_state, fit_or_fail, ray_session

TOKEN_COLUMNS = ["input_ids", "attention_mask", "label"]
EVAL_BATCH = 256


def tokens_of(frame: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, 2, length) token tensor and labels from a tokenized split (pandas or Ray Data numpy batch)."""
    ids = np.stack(list(frame["input_ids"])).astype(np.int64)
    mask = np.stack(list(frame["attention_mask"])).astype(np.int64)
    return torch.from_numpy(np.stack([ids, mask], axis=1)), torch.from_numpy(np.array(frame["label"], dtype=np.int64))


def _shard(config: dict[str, Any], name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    batches = [tokens_of(b) for b in worker_batches(config, name, batch_size=4096, batch_format="numpy")]
    tokens = torch.cat([t for t, _ in batches]) if batches else torch.empty((0, 2, 1), dtype=torch.int64)
    labels = torch.cat([y for _, y in batches]) if batches else torch.empty(0, dtype=torch.int64)
    return tokens.to(device), labels.to(device)


def evaluate_in_batches(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, int]:
    """:func:`evaluate_epoch` a batch at a time: a transformer over every row at once needs too much memory."""
    totals = [0.0, 0.0, 0]
    for start in range(0, len(labels), EVAL_BATCH):
        loss, correct, count = evaluate_epoch(model, tokens[start:start + EVAL_BATCH], labels[start:start + EVAL_BATCH])
        totals = [totals[0] + loss, totals[1] + correct, totals[2] + count]
    return totals[0], totals[1], int(totals[2])


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Fine-tune with early stopping on validation loss, checkpointing every epoch."""
    import ray.train
    import ray.train.torch

    torch.manual_seed(config["seed"])
    torch.set_num_threads(config["threads_per_worker"])
    device = ray.train.torch.get_device()
    train_x, train_y = _shard(config, "train", device)
    val_x, val_y = _shard(config, "val", device)
    model = ray.train.torch.prepare_model(pretrained_classifier(IntentSpec.model_validate(config["spec"])))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["learning_rate"], weight_decay=config["weight_decay"])
    state: TrainState = restore(model, optimizer)
    fit_epochs(model, optimizer, state, (train_x, train_y, val_x, val_y), config, device,
               evaluate=evaluate_in_batches)


def train_intents(splits_uri: str, config: IntentTrainConfig, output_uri: str, checkpoint_uri: str,
                  settings: KeelSettings, run_name: str = "train") -> dict[str, Any]:
    """Fine-tune on the published token splits; publish the best epoch's model (by validation loss)."""
    manifest = storage.read_manifest(splits_uri, settings)
    spec = IntentSpec(labels=manifest["labels"], max_length=manifest["max_length"], dropout=config.dropout)
    with storage.staged_output(output_uri, "train", settings) as out, ray_session(settings) as ray_startup_s, \
            tempfile.TemporaryDirectory(prefix="keel-intents-") as scratch:
        started = time.perf_counter()
        result, scaling = _fit(config, spec, manifest["splits"], checkpoint_uri, run_name, settings)
        state: TrainState = final_state(result, "no epoch produced a finite validation loss; lower the learning rate.")
        assert state.best_weights is not None  # final_state raises otherwise
        model = classifier_shape(spec)
        model.load_state_dict(state.best_weights)
        save_intent_model(model, spec, tokenizer_of(manifest, Path(scratch), settings), out.dir)
        out.write_json("history.json", state.history)
        best = min(state.history, key=lambda h: h["val_loss"])
        out.manifest.update(
            epochs=state.epoch, best_val_loss=state.best_val_loss, best_val_accuracy=best["val_accuracy"],
            scaling=scaling, ray_startup_s=round(ray_startup_s, 3), fit_s=round(time.perf_counter() - started, 3),
            parameters=sum(p.numel() for p in model.parameters()), checkpoints=checkpoint_uri,
            resumed_from_epochs=state.resumed_from, samples_seen=state.samples_seen,
            summary=(f"{state.epoch} epoch(s), best val loss {state.best_val_loss:.4f}, accuracy "
                     f"{best['val_accuracy']:.4f}, {scaling['num_workers']} worker(s)"
                     f"{' on GPU' if scaling['use_gpu'] else ''}"),
        )
    return out.manifest


def train_intents_stage(settings: KeelSettings, splits_uri: str, config: dict[str, Any], output_uri: str,
                        checkpoint_uri: str, run_name: str = "train") -> dict[str, Any]:
    """:func:`train_intents` with its config as plain data: what a Ray job receives (:mod:`keel.jobs`)."""
    return train_intents(splits_uri, IntentTrainConfig.model_validate(config), output_uri, checkpoint_uri, settings,
                         run_name=run_name)


def _fit(config: IntentTrainConfig, spec: IntentSpec, splits: dict[str, str], checkpoint_uri: str, run_name: str,
         settings: KeelSettings) -> tuple[Any, dict[str, Any]]:
    parameters = (pretrained_dir() / "model.safetensors").stat().st_size // 4  # float32 weights: 22.7M
    scaling = cluster_scaling(config.scaling, parameters, settings)
    inputs = read_splits(splits, ("train", "val"), settings, columns=TOKEN_COLUMNS)
    loop_config = {**config.model_dump(exclude={"max_failures", "scaling"}), "spec": spec.model_dump(),
                   "threads_per_worker": scaling["cpus_per_worker"]}
    trainer = build_trainer(train_loop_per_worker, loop_config, inputs, scaling, config.max_failures,
                            checkpoint_uri, run_name, settings)
    return fit_or_fail(trainer, config.max_failures), scaling
