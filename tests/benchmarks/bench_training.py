"""Train stage (Ray Train) against a plain PyTorch loop: same model, data, threads and epochs.

Prints one JSON report as its last line. Goals: the stage reaches at least
0.9x the plain loop's training samples/s, counted over whole epochs (training,
validation, and for the stage also checkpointing, reporting and MLflow
logging); Ray start-up and trainer set-up/tear-down are reported separately.
MLflow logging costs at most 1% of the stage's training time.
The set-up and tear-down of a run whose splits reach the workers through
the object store (what a split up to 256 MiB gets) are compared with the
same run reading them through Ray Data (``setup_and_teardown_ratio``).
Runs on the GPU too when one is present.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROWS, FEATURES, EPOCHS, BATCH, HIDDEN = 400_000, 32, 5, 256, [256, 256]


def synthetic_table(path: Path) -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(ROWS, FEATURES)).astype(np.float32)
    weights = rng.normal(size=FEATURES)
    frame = pd.DataFrame(features, columns=[f"x{i}" for i in range(FEATURES)])
    frame["label"] = np.where(features @ weights + rng.normal(size=ROWS) > 0, "pos", "neg")
    frame.to_parquet(path, index=False)


def contract() -> dict:
    columns = {f"x{i}": {"dtype": "float"} for i in range(FEATURES)}
    return {"name": "bench", "target": "label", "columns": {**columns, "label": {"dtype": "category"}}}


def _tensors(path: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    table = pd.read_parquet(path)
    return (torch.tensor(table.drop(columns=["label"]).to_numpy(np.float32), device=device),
            torch.tensor(table["label"].to_numpy(np.int64), device=device))


def plain_torch(splits: dict, device: str, threads: int) -> float:
    """The baseline: an ordinary in-memory PyTorch loop validating each epoch; training samples/s."""
    from keel.train.model import MLPClassifier, MLPSpec

    torch.set_num_threads(threads)
    x, y = _tensors(splits["train"], device)
    val_x, val_y = _tensors(splits["val"], device)
    torch.manual_seed(0)
    model = MLPClassifier(MLPSpec(input_dim=FEATURES, hidden_sizes=HIDDEN, num_classes=2)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seconds = 0.0
    for _ in range(EPOCHS):
        started = time.perf_counter()
        for batch in torch.randperm(len(y), device=device).split(BATCH):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
        with torch.no_grad():
            torch.nn.functional.cross_entropy(model(val_x), val_y).item()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - started
    return EPOCHS * len(y) / seconds


def train_stage(splits_uri: str, settings, use_gpu: bool, run_id: str = "") -> dict:
    from keel import storage, tracking
    from keel.train.config import TrainConfig
    from keel.train.trainer import train

    config = TrainConfig(hidden_sizes=HIDDEN, batch_size=BATCH, max_epochs=EPOCHS, patience=EPOCHS, dropout=0,
                         weight_decay=0, scaling={"use_gpu": use_gpu})
    run_id = run_id or f"bench-{'gpu' if use_gpu else 'cpu'}"
    mlflow_run = tracking.pipeline_run(settings, run_id, "bench")
    return train(splits_uri, config, storage.stage_uri(settings, run_id, "train"),
                 storage.join(storage.run_uri(settings, run_id), "checkpoints"), settings,
                 run_name=run_id, mlflow_run_id=mlflow_run)


def through_ray_data(splits_uri: str, settings) -> dict:
    """The CPU stage again, its splits read by Ray Data tasks as a split over 256 MiB would be."""
    from keel.train import ingest

    kept = ingest.DRIVER_READ_MAX_BYTES
    ingest.DRIVER_READ_MAX_BYTES = 0
    try:
        return train_stage(splits_uri, settings, use_gpu=False, run_id="bench-ray-data")
    finally:
        ingest.DRIVER_READ_MAX_BYTES = kept


def measure(device: str, splits_uri: str, splits: dict, settings) -> dict:
    stage = train_stage(splits_uri, settings, use_gpu=device == "cuda")
    threads = stage["scaling"]["cpus_per_worker"]
    baseline = plain_torch(splits, device, threads)
    return {
        "device": device, "threads": threads, "workers": stage["scaling"]["num_workers"],
        "plain_torch_samples_per_s": round(baseline, 1),
        "train_stage_samples_per_s": stage["samples_per_s"],
        "samples_per_s_ratio": round(stage["samples_per_s"] / baseline, 3),
        "mlflow_log_s": stage["mlflow_log_s"], "loop_s": stage["loop_s"],
        "mlflow_log_time_ratio": round(stage["mlflow_log_s"] / stage["loop_s"], 5),
        "ray_startup_s": stage["ray_startup_s"], "fit_s": stage["fit_s"],
        "trainer_setup_and_teardown_s": round(stage["fit_s"] - stage["loop_s"], 2),
    }


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="keel-bench-") as scratch:
        os.environ["KEEL_HOME"] = str(Path(scratch) / ".keel")
        from keel import storage
        from keel.data.contract import parse_contract
        from keel.data.ingest import ingest
        from keel.data.preprocess import PreprocessConfig, preprocess
        from keel.settings import load_settings

        settings = load_settings()
        synthetic_table(Path(scratch) / "table.parquet")
        ingested, splits_uri = (storage.stage_uri(settings, "data", s) for s in ("ingest", "preprocess"))
        ingest(str(Path(scratch) / "table.parquet"), ingested, settings)
        manifest = preprocess(ingested, parse_contract(contract(), "bench"), PreprocessConfig(), splits_uri, settings)
        devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
        results = [measure(device, splits_uri, manifest["splits"], settings) for device in devices]
        ray_data = through_ray_data(splits_uri, settings)
    cpu = results[0]
    ray_data_setup_s = round(ray_data["fit_s"] - ray_data["loop_s"], 2)
    report = {"benchmark": "training", "rows": manifest["rows"]["train"], "epochs": EPOCHS, "results": results,
              "samples_per_s_ratio": cpu["samples_per_s_ratio"], "mlflow_log_time_ratio": cpu["mlflow_log_time_ratio"],
              "ray_data_trainer_setup_and_teardown_s": ray_data_setup_s,
              "setup_and_teardown_ratio": round(cpu["trainer_setup_and_teardown_s"] / ray_data_setup_s, 3),
              "gpu": "measured" if len(results) > 1 else "no GPU present",
              "goals": {"samples_per_s_ratio": ">= 0.9", "mlflow_log_time_ratio": "<= 0.01"}}
    report["goals_met"] = cpu["samples_per_s_ratio"] >= 0.9 and cpu["mlflow_log_time_ratio"] <= 0.01
    print(json.dumps(report))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
