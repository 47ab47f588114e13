"""Tuning: Optuna TPE + ASHA against random search (no early stopping), same trial budget, same run.

Both searches use the medical_diagnosis pipeline's search space and data and
the tune stage's own trial code. Every epoch of every trial is one report;
walking the reports in the order they happened, each search is charged the
epochs (and wall seconds) it spent until a trial first reached random
search's best validation loss.

One search pair is one draw: where random search happens to find its best
varies a lot between seeds (``random_target_at_fraction``: how far into its
own epochs it got there), so the pair runs for ``KEEL_BENCH_REPEATS`` seeds
(default 5) and the ratios reported are medians over them.

With two trials at a time, what TPE and ASHA have seen when they decide depends on which trial reported
first, so a seed's result varies between runs; ``KEEL_BENCH_TUNING_CONCURRENCY=1`` runs the trials one at a
time, and each search then repeats exactly.

``KEEL_BENCH_TUNING_DATA=synthetic`` runs the same searches on a larger
problem instead (12,000 rows of ``make_classification``, 30 features, a
4,000-row validation split): the demo's 86 validation rows measure a loss
too coarsely to tell the two searches' best apart from noise.

Prints one JSON report as its last line. Goal (issue 4): TPE + ASHA needs at
most one third of random search's epochs to get there.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TRIALS = 24
REPEATS = int(os.environ.get("KEEL_BENCH_REPEATS", "5"))
DATA = os.environ.get("KEEL_BENCH_TUNING_DATA", "demo")
# "auto" (the pipeline's: one trial per CPU) or a number; 1 makes each search repeat exactly from its seed
CONCURRENCY = os.environ.get("KEEL_BENCH_TUNING_CONCURRENCY", "auto")


def reports_in_order(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every epoch report of every trial, by the time it was made."""
    return sorted((row for record in records for row in record["history"]), key=lambda row: row["reported_at"])


def cost_to_reach(records: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """Epochs and seconds spent (all trials together) until some trial's val_loss reached ``target``."""
    rows = reports_in_order(records)
    started = min(row["reported_at"] - row["time_this_iter_s"] for row in rows)
    for spent, row in enumerate(rows, start=1):
        if row["val_loss"] <= target + 1e-12:
            return {"epochs": spent, "wall_s": round(row["reported_at"] - started, 3), "reached": True}
    return {"epochs": len(rows), "wall_s": round(rows[-1]["reported_at"] - started, 3), "reached": False}


def compare(records: dict[str, list[dict[str, Any]]], seconds: dict[str, float], seed: int) -> dict[str, Any]:
    """One seed's pair of searches: the cost of each to reach random search's best."""
    target = min(r["val_loss"] for r in records["random"])
    reach = {method: cost_to_reach(found, target) for method, found in records.items()}
    epochs = {m: sum(r["epochs"] for r in found) for m, found in records.items()}
    return {
        "seed": seed, "random_best_val_loss": target,
        "tpe_asha_best_val_loss": min(r["val_loss"] for r in records["tpe_asha"]),
        "total_epochs": epochs, "search_wall_s": seconds, "to_reach_random_best": reach,
        "epochs_to_target_ratio": reach["tpe_asha"]["epochs"] / reach["random"]["epochs"]
        if reach["tpe_asha"]["reached"] else float("inf"),
        "wall_to_target_ratio": reach["tpe_asha"]["wall_s"] / max(reach["random"]["wall_s"], 1e-9)
        if reach["tpe_asha"]["reached"] else float("inf"),
        "total_epochs_ratio": epochs["tpe_asha"] / epochs["random"],
        "random_target_at_fraction": round(reach["random"]["epochs"] / epochs["random"], 3),
    }


def _json_safe(value: Any) -> Any:
    """``null`` where TPE + ASHA never reached the target (an infinite ratio is not JSON)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return None if isinstance(value, float) and value == float("inf") else value


def demo_arrays(settings: Any, config: Any) -> dict[str, Any]:
    """The demo's train and validation splits, through the pipeline's own ingest and preprocess."""
    from keel import storage
    from keel.data.ingest import ingest
    from keel.data.preprocess import preprocess
    from keel.data.transform import FeatureTransform
    from keel.tune import _arrays
    from pipelines.medical_diagnosis.pipeline import DEFAULT_SOURCE

    ingested, splits = storage.stage_uri(settings, "bench", "ingest"), storage.stage_uri(settings, "bench", "prep")
    ingest(DEFAULT_SOURCE, ingested, settings)
    manifest = preprocess(ingested, config.contract, config.preprocess, splits, settings)
    transform = FeatureTransform.load(Path(manifest["transform"]))
    return _arrays(manifest["splits"], transform.feature_names, len(transform.classes), settings)


def synthetic_arrays() -> dict[str, Any]:
    """A larger problem of the demo's width, standardized as preprocess would: 8,000 training rows, 4,000 validation."""
    import numpy as np
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=12000, n_features=30, n_informative=12, n_redundant=6, class_sep=0.8,
                               flip_y=0.03, random_state=0)
    x = ((x - x.mean(axis=0)) / x.std(axis=0)).astype(np.float32)
    y = y.astype(np.int64)
    return {"num_classes": 2, "train_x": x[:8000], "train_y": y[:8000], "val_x": x[8000:], "val_y": y[8000:]}


def main() -> None:
    import statistics

    with tempfile.TemporaryDirectory(prefix="keel-bench-") as scratch:
        os.environ["KEEL_HOME"] = str(Path(scratch) / ".keel")
        from keel.config import load_pipeline_config
        from keel.settings import load_settings
        from keel.tune import search
        from pipelines.medical_diagnosis.pipeline import CONFIG_FILE

        settings, config = load_settings(), load_pipeline_config(CONFIG_FILE)
        data = synthetic_arrays() if DATA == "synthetic" else demo_arrays(settings, config)
        runs = []
        for seed in range(config.tune.seed, config.tune.seed + REPEATS):
            tune_config = config.tune.model_validate({**config.tune.model_dump(), "num_samples": TRIALS, "seed": seed,
                                                      "max_concurrent_trials": CONCURRENCY})
            records, seconds = {}, {}
            for method in ("random", "tpe_asha"):
                started = time.perf_counter()
                records[method] = search(tune_config, config.train, data, f"bench-{method}-{seed}", settings, method)
                seconds[method] = round(time.perf_counter() - started, 2)
            runs.append(compare(records, seconds, seed))
            print(f"seed {seed}: {json.dumps(_json_safe(runs[-1]))}", file=sys.stderr, flush=True)
    report = {"benchmark": "tuning", "data": DATA, "validation_rows": len(data["val_y"]), "trials": TRIALS,
              "max_concurrent_trials": CONCURRENCY,
              "max_epochs_per_trial": config.tune.max_epochs, "repeats": REPEATS, "runs": runs}
    for key in ("epochs_to_target_ratio", "wall_to_target_ratio", "total_epochs_ratio"):
        report[key] = statistics.median(run[key] for run in runs)
    report["target_reached_runs"] = sum(run["to_reach_random_best"]["tpe_asha"]["reached"] for run in runs)
    report["goals"] = {"epochs_to_target_ratio": "<= 0.333 (median over seeds)"}
    report["goals_met"] = report["epochs_to_target_ratio"] <= 1 / 3
    print(json.dumps(_json_safe(report)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
