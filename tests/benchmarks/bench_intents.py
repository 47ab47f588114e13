"""customer_service_intents with its default config: the fine-tuned transformer against a bag-of-words
baseline, and its compressed variants against the fine-tuned model, all in the same run.

The pipeline's data, train and evaluate stages run in-process with the
pipeline's own config; latency is the serving path (scrub, tokenize,
forward) on one CPU thread, p50 at batch 1 and 32.

Prints one JSON report as its last line. Goals (issue 7): the fine-tuned
model beats the baseline's macro-F1 on held-out phrasings by at least 10
points; a distilled or int8 variant at least 2x faster within 2 points of
the fine-tuned model's macro-F1.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def ratios(evaluation: dict[str, Any]) -> dict[str, Any]:
    variants = {v["name"]: v for v in evaluation["variants"]}
    fine_tuned = variants["fine_tuned"]
    report: dict[str, Any] = {
        "fine_tuned_f1_macro": fine_tuned["f1_macro"],
        "baseline_bow_f1_macro": evaluation["baseline_bag_of_words"]["f1_macro"],
        "f1_gain_over_baseline": fine_tuned["f1_macro"] - evaluation["baseline_bag_of_words"]["f1_macro"],
        "f1_ratio_over_baseline": fine_tuned["f1_macro"] / evaluation["baseline_bag_of_words"]["f1_macro"],
        "chosen": evaluation["chosen"],
    }
    for name, variant in variants.items():
        if name == "fine_tuned":
            continue
        report[f"{name}_speedup_batch1_ratio"] = fine_tuned["latency_p50_ms_batch1"] / variant["latency_p50_ms_batch1"]
        report[f"{name}_speedup_batch32_ratio"] = fine_tuned["latency_p50_ms_batch32"] / variant["latency_p50_ms_batch32"]
        report[f"{name}_f1_drop"] = variant["f1_macro_drop"]
        report[f"{name}_size_ratio"] = fine_tuned["size_bytes"] / variant["size_bytes"]
    return report


def goals(report: dict[str, Any]) -> dict[str, bool]:
    fast_and_close = [name for name in ("int8", "distilled", "distilled_int8")
                      if min(report[f"{name}_speedup_batch1_ratio"], report[f"{name}_speedup_batch32_ratio"]) >= 2.0
                      and report[f"{name}_f1_drop"] <= 0.02]
    return {"beats_baseline_by_10_points": report["f1_gain_over_baseline"] >= 0.10,
            "variant_2x_faster_within_2_points": bool(fast_and_close)}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="keel-bench-") as scratch:
        os.environ["KEEL_HOME"] = str(Path(scratch) / ".keel")
        from keel import storage
        from keel.config import load_pipeline_config
        from keel.intents.evaluate import evaluate_intents
        from keel.intents.prepare import BUILTIN_SOURCE, prepare_utterances
        from keel.intents.train import train_intents
        from keel.settings import load_settings
        from pipelines.customer_service_intents.pipeline import CONFIG_FILE

        settings, config = load_settings(), load_pipeline_config(CONFIG_FILE)
        uri = {s: storage.stage_uri(settings, "bench", s) for s in ("ingest", "train", "evaluate")}
        started = time.perf_counter()
        prepare_utterances(BUILTIN_SOURCE, config.utterances, uri["ingest"], settings)
        trained = train_intents(uri["ingest"], config.train, uri["train"], storage.join(uri["train"], "ckpt"), settings)
        evaluation = evaluate_intents(uri["train"], uri["ingest"], uri["evaluate"], settings, config.compress,
                                      config.evaluate)
        report = {**ratios(evaluation), "epochs": trained["epochs"],
                  "wall_s": round(time.perf_counter() - started, 1)}
    report["goals_met"] = goals(report)
    print(json.dumps(report, sort_keys=True))


if __name__ == "__main__":
    main()
