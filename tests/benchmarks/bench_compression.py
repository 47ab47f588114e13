"""Compression on the demo model: int8 and a distilled student against the trained model, same run.

The demo model is what `keel run medical_diagnosis` trains: its tune, train
and compress stages run here in-process with the pipeline's own config. A
second, wide teacher ([4096, 4096], the same data) shows the regime where
dynamic int8 pays off at batch 1: a small MLP's forward pass is bound by
per-layer dispatch, not by weight bandwidth, so int8 can't make it 3x faster.

Prints one JSON report as its last line. Goals (issue 4): int8 at least 3.5x
smaller and 3x faster at batch 1 and 32 with at most 1 point accuracy drop; a
distilled student with at most half the parameters keeping at least 97% of the
teacher's accuracy.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

WIDE_HIDDEN = [4096, 4096]


def ratios(variants: dict[str, dict[str, Any]]) -> dict[str, float]:
    base, int8, student = variants["baseline"], variants["int8"], variants["distilled"]
    return {
        "int8_size_ratio": base["size_bytes"] / int8["size_bytes"],
        "int8_speedup_batch1_ratio": base["latency_p50_ms_batch1"] / int8["latency_p50_ms_batch1"],
        "int8_speedup_batch32_ratio": base["latency_p50_ms_batch32"] / int8["latency_p50_ms_batch32"],
        "int8_accuracy_drop": int8["accuracy_drop"],
        "student_parameter_ratio": student["parameters"] / base["parameters"],
        "student_accuracy_retention_ratio": student["accuracy"] / base["accuracy"],
    }


def goals(r: dict[str, float]) -> dict[str, bool]:
    return {"int8_size": r["int8_size_ratio"] >= 3.5, "int8_batch1": r["int8_speedup_batch1_ratio"] >= 3.0,
            "int8_batch32": r["int8_speedup_batch32_ratio"] >= 3.0, "int8_accuracy": r["int8_accuracy_drop"] <= 0.01,
            "student_params": r["student_parameter_ratio"] <= 0.5,
            "student_accuracy": r["student_accuracy_retention_ratio"] >= 0.97}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="keel-bench-") as scratch:
        os.environ["KEEL_HOME"] = str(Path(scratch) / ".keel")
        from keel import storage
        from keel.compress import compress
        from keel.data.ingest import ingest
        from keel.data.preprocess import preprocess
        from keel.settings import load_settings
        from keel.train.trainer import train
        from keel.tune import tune, tuned_train_config
        from pipelines.medical_diagnosis.pipeline import CONFIG_FILE, DEFAULT_SOURCE
        from keel.config import load_pipeline_config

        settings, config = load_settings(), load_pipeline_config(CONFIG_FILE)
        uri = {s: storage.stage_uri(settings, "bench", s) for s in ("ingest", "preprocess", "tune")}
        ingest(DEFAULT_SOURCE, uri["ingest"], settings)
        preprocess(uri["ingest"], config.contract, config.preprocess, uri["preprocess"], settings)
        tuned = tuned_train_config(config.train, tune(uri["preprocess"], config.train, config.tune, uri["tune"],
                                                       settings, run_name="bench-tune"))
        compress_config = config.compress.model_copy(update={"latency_repeats": 500, "latency_budget_ms": 1e6})
        results = {}
        for name, train_config in (("demo", tuned), ("wide", tuned.model_copy(update={
                "hidden_sizes": WIDE_HIDDEN, "max_epochs": 15, "learning_rate": 1e-4}))):
            model_uri = storage.stage_uri(settings, f"bench-{name}", "train")
            train(uri["preprocess"], train_config, model_uri, storage.stage_uri(settings, f"bench-{name}", "ckpt"),
                  settings, run_name=f"bench-{name}")
            manifest = compress(model_uri, uri["preprocess"], compress_config,
                                storage.stage_uri(settings, f"bench-{name}", "compress"), settings)
            variant_ratios = ratios(manifest["variants"])
            results[name] = {"hidden_sizes": train_config.hidden_sizes, "variants": manifest["variants"],
                             "chosen_by_policy": manifest["chosen"], **variant_ratios,
                             "goals_met": goals(variant_ratios)}
    demo = results["demo"]
    report = {"benchmark": "compression", "results": results,
              **{k: v for k, v in demo.items() if "ratio" in k or k == "int8_accuracy_drop"},
              "wide_int8_speedup_batch1_ratio": results["wide"]["int8_speedup_batch1_ratio"],
              "wide_int8_speedup_batch32_ratio": results["wide"]["int8_speedup_batch32_ratio"],
              "goals": {"int8_size_ratio": ">= 3.5", "int8_speedup_batch1_ratio": ">= 3",
                        "int8_speedup_batch32_ratio": ">= 3", "int8_accuracy_drop": "<= 0.01",
                        "student_parameter_ratio": "<= 0.5", "student_accuracy_retention_ratio": ">= 0.97"},
              "goals_met_demo": demo["goals_met"], "goals_met_wide": results["wide"]["goals_met"]}
    print(json.dumps(report, default=float))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
