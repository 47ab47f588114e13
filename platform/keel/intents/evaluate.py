"""Score the fine-tuned model, its compressed variants and a bag-of-words baseline; choose; gate.

One stage, because every number here must come from the same held-out
phrasings and the same CPU in the same run: macro-F1 of each variant, its
latency through the serving path (scrub, tokenize, forward) at batch 1 and 32,
and the baseline the issue measures the transformer against. The policy
registers the fastest variant within ``max_f1_drop`` of the fine-tuned model;
the gate compares that variant with the champion (rescored on these rows) and
requires ``min_gain_over_baseline`` over the bag-of-words model.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from keel import storage, tracking
from keel.compress import (REPORT_HTML, VariantReport, Policy, choose, p50_ms_one_thread, serialized_bytes,
                           write_report_pages)
from keel.config import RegisterConfig
from keel.evaluate import gate_with_rescored_champion
from keel.gate import GateDecision
from keel.intents.config import IntentCompressConfig, IntentEvaluateConfig
from keel.intents.model import IntentClassifier, IntentModel, IntentSpec, keep_layers, load_intent_model, save_intent_model
from keel.intents.train import EVAL_BATCH, tokens_of
from keel.monitor.drift import write_prediction_reference
from keel.settings import KeelSettings
from keel.train.loop import train_epoch
from keel.train.model import quantize_int8

EVALUATION_FILE = "evaluation.json"
MODEL_DIR = "model"
FINE_TUNED = "fine_tuned"
LATENCY_BATCHES = (1, 32)


def macro_f1(labels: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return float(f1_score(labels, predicted, average="macro")), float(accuracy_score(labels, predicted))


def bag_of_words_baseline(train: pd.DataFrame, test: pd.DataFrame) -> dict[str, float]:
    """Unigrams and bigrams into a logistic regression: the model a transformer has to beat."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = CountVectorizer(ngram_range=(1, 2), lowercase=True)
    classifier = LogisticRegression(max_iter=2000).fit(vectorizer.fit_transform(train["text"]), train["label"])
    f1, accuracy = macro_f1(test["label"].to_numpy(), classifier.predict(vectorizer.transform(test["text"])))
    return {"f1_macro": f1, "accuracy": accuracy}


@torch.no_grad()
def logits_of(network: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    network.eval()
    return torch.cat([network(tokens[i:i + EVAL_BATCH]) for i in range(0, len(tokens), EVAL_BATCH)])


def distill(teacher: IntentClassifier, spec: IntentSpec, tokens: torch.Tensor, labels: torch.Tensor,
            config: IntentCompressConfig) -> IntentClassifier:
    """A student of the teacher's first ``student_layers`` layers, trained on its softened logits and the labels."""
    student = copy.deepcopy(teacher)
    keep_layers(student.encoder, config.student_layers)
    soft_targets = torch.softmax(logits_of(teacher, tokens) / config.temperature, dim=1)
    cross_entropy = nn.CrossEntropyLoss()

    def loss_fn(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        soft = nn.functional.kl_div(nn.functional.log_softmax(logits / config.temperature, dim=1),
                                    soft_targets[batch], reduction="batchmean") * config.temperature ** 2
        return config.distill_weight * soft + (1 - config.distill_weight) * cross_entropy(logits, labels[batch])

    optimizer = torch.optim.AdamW(student.parameters(), lr=config.learning_rate)
    generator = torch.Generator().manual_seed(0)
    for _ in range(config.distill_epochs):
        train_epoch(student, optimizer, tokens, labels, 32, generator, loss_fn)
    return student.eval()


def build_variants(teacher: IntentClassifier, spec: IntentSpec, tokens: torch.Tensor, labels: torch.Tensor,
                   config: IntentCompressConfig) -> dict[str, tuple[nn.Module, nn.Module, IntentSpec]]:
    """name -> (network to score, float network to save, spec); int8 is applied again when loaded."""
    student = distill(teacher, spec, tokens, labels, config)
    student_spec = spec.model_copy(update={"layers": config.student_layers})
    return {
        FINE_TUNED: (teacher, teacher, spec),
        "int8": (quantize_int8(copy.deepcopy(teacher)), teacher, spec.model_copy(update={"int8": True})),
        "distilled": (student, student, student_spec),
        "distilled_int8": (quantize_int8(copy.deepcopy(student)), student,
                           student_spec.model_copy(update={"int8": True})),
    }


def measure(name: str, model: IntentModel, float_network: nn.Module, test: pd.DataFrame,
            reference: VariantReport | None, repeats: int) -> tuple[VariantReport, np.ndarray]:
    """Macro-F1 and accuracy on the held-out rows, size, and serving-path latency at batch 1 and 32; and the
    intent predicted for each row."""
    texts, labels = test["text"].tolist(), test["label"].to_numpy()
    predicted = torch.cat([model.probabilities(texts[i:i + EVAL_BATCH]).argmax(dim=1)
                           for i in range(0, len(texts), EVAL_BATCH)]).numpy()
    f1, accuracy = macro_f1(labels, predicted)
    # A transformer call takes milliseconds: three warm-up calls settle it (ten would cost seconds per variant).
    latencies = [p50_ms_one_thread(partial(model.probabilities, texts[:batch]), repeats, warmup=3)
                 for batch in LATENCY_BATCHES]
    parameters = sum(p.numel() for p in float_network.parameters())
    return VariantReport(
        name=name, accuracy=accuracy, f1_macro=f1, parameters=parameters, nonzero_parameters=parameters,
        accuracy_drop=0.0 if reference is None else reference.accuracy - accuracy,
        f1_macro_drop=0.0 if reference is None else reference.f1_macro - f1,
        size_bytes=serialized_bytes(model.network), latency_p50_ms_batch1=latencies[0],
        latency_p50_ms_batch32=latencies[1]), predicted


def rescore(champion: IntentModel, test: pd.DataFrame) -> dict[str, float]:
    """Macro-F1 and accuracy of a registered intent model on these held-out rows (same intents required)."""
    index = {label: i for i, label in enumerate(champion.labels)}
    labels = test["intent"].map(index)
    if labels.isna().any():
        raise ValueError("the champion knows other intents")
    texts = test["text"].tolist()
    predicted = torch.cat([champion.probabilities(texts[i:i + EVAL_BATCH]).argmax(dim=1)
                           for i in range(0, len(texts), EVAL_BATCH)]).numpy()
    f1, accuracy = macro_f1(labels.to_numpy(dtype=np.int64), predicted)
    return {"f1_macro": f1, "accuracy": accuracy}


def gate(chosen: VariantReport, baseline: dict[str, float], config: IntentEvaluateConfig,
         registry: RegisterConfig | None, test: pd.DataFrame, settings: KeelSettings) -> tuple[GateDecision, dict | None]:
    """Macro-F1 against the champion rescored on ``test``, and a margin over the bag-of-words baseline."""
    gain = chosen.f1_macro - baseline["f1_macro"]
    return gate_with_rescored_champion(
        {"f1_macro": chosen.f1_macro, "accuracy": chosen.accuracy}, "f1_macro", registry, settings,
        lambda python_model: rescore(python_model.intents, test), config.tolerance,
        (gain >= config.min_gain_over_baseline - 1e-12,
         f"macro-F1 {chosen.f1_macro:.4f} is {abs(gain):.4f} {'over' if gain >= 0 else 'under'} the bag-of-words "
         f"baseline's {baseline['f1_macro']:.4f} (at least {config.min_gain_over_baseline} over it needed)"))


def evaluate_intents(model_uri: str, splits_uri: str, output_uri: str, settings: KeelSettings,
                     compress: IntentCompressConfig, config: IntentEvaluateConfig,
                     registry: RegisterConfig | None = None, mlflow_run_id: str = "") -> dict[str, Any]:
    """Variants, baseline, choice and gate; publishes the chosen model under ``model/`` with the report."""
    from keel.intents.prepare import read_splits

    with storage.staged_output(output_uri, "evaluate", settings) as out, \
            tempfile.TemporaryDirectory(prefix="keel-intents-") as scratch:
        network, spec, tokenizer = load_intent_model(storage.download_directory(model_uri, Path(scratch) / "m", settings))
        assert isinstance(network, IntentClassifier)
        train, test = read_splits(splits_uri, ("train", "test"), settings)
        started = time.perf_counter()
        baseline = bag_of_words_baseline(train, test)
        tokens, labels = tokens_of(train)
        reports: list[VariantReport] = []
        saved: dict[str, tuple[nn.Module, IntentSpec, np.ndarray]] = {}
        for name, (scored, float_network, variant_spec) in build_variants(network, spec, tokens, labels,
                                                                          compress).items():
            measured, predicted = measure(name, IntentModel(scored, variant_spec, tokenizer), float_network, test,
                                          reports[0] if reports else None, compress.latency_repeats)
            reports.append(measured)
            saved[name] = (float_network, variant_spec, predicted)
        chosen_name, reason = choose(reports, Policy("f1_macro", compress.max_f1_drop, float("inf"), 1, "compress.max_f1_drop"))
        chosen = next(r for r in reports if r.name == chosen_name)
        decision, champion = gate(chosen, baseline, config, registry, test, settings)
        chosen_network, chosen_spec, chosen_predictions = saved[chosen_name]
        assert isinstance(chosen_network, IntentClassifier)
        save_intent_model(chosen_network, chosen_spec, tokenizer, out.path(MODEL_DIR))
        write_prediction_reference(out.path(MODEL_DIR),  # what serving's prediction drift compares with
                                   pd.Series(np.asarray(chosen_spec.labels)[chosen_predictions]), chosen_spec.labels)
        out.write_json(f"{MODEL_DIR}/{storage.MANIFEST}", {"stage": "evaluate", "variant": chosen_name})
        figure = write_report_pages(out.dir, reports, chosen_name, reason, "f1_macro")
        fine_tuned = reports[0]
        report: dict[str, Any] = {
            "f1_macro": chosen.f1_macro, "accuracy": chosen.accuracy, "chosen": chosen_name, "reason": reason,
            "fine_tuned": asdict(fine_tuned), "baseline_bag_of_words": baseline,
            "gain_over_baseline": fine_tuned.f1_macro - baseline["f1_macro"],
            "variants": [asdict(r) for r in reports], "speedup": _speedups(reports),
            "gate": decision.to_dict(), "champion": champion, "model_uri": model_uri,
            "seconds": round(time.perf_counter() - started, 3),
        }
        out.write_json(EVALUATION_FILE, report)
        if mlflow_run_id:
            _log_to_mlflow(settings, mlflow_run_id, report, reports, figure, out.path(REPORT_HTML))
        out.manifest.update(
            f1_macro=chosen.f1_macro, chosen=chosen_name, evaluation=out.uri_of(EVALUATION_FILE), splits_uri=splits_uri,
            model_uri=out.uri_of(MODEL_DIR), report_html=out.uri_of(REPORT_HTML), gate_passed=decision.passed,
            gate=decision.summary,
            summary=(f"fine-tuned macro-F1 {fine_tuned.f1_macro:.4f} vs bag-of-words {baseline['f1_macro']:.4f}; "
                     f"registering {chosen_name} (macro-F1 {chosen.f1_macro:.4f}, "
                     f"{report['speedup'][chosen_name]['batch1']:.2f}x faster at batch 1); {decision.verdict}"))
    return report


def _speedups(reports: list[VariantReport]) -> dict[str, dict[str, float]]:
    reference = reports[0]
    return {r.name: {"batch1": reference.latency_p50_ms_batch1 / r.latency_p50_ms_batch1,
                     "batch32": reference.latency_p50_ms_batch32 / r.latency_p50_ms_batch32} for r in reports}


def _log_to_mlflow(settings: KeelSettings, run_id: str, report: dict[str, Any], reports: list[VariantReport],
                   figure: Any, html_path: Path) -> None:
    from mlflow.entities import Metric

    client, now = tracking.mlflow_client(settings), int(time.time() * 1000)
    values = {"eval_f1_macro": report["f1_macro"], "eval_accuracy": report["accuracy"],
              "fine_tuned_f1_macro": report["fine_tuned"]["f1_macro"],
              "baseline_bow_f1_macro": report["baseline_bag_of_words"]["f1_macro"],
              "gain_over_baseline": report["gain_over_baseline"], "gate_passed": float(report["gate"]["passed"])}
    for r in reports:
        values.update({f"{r.name}_f1_macro": r.f1_macro, f"{r.name}_latency_p50_ms_batch1": r.latency_p50_ms_batch1,
                       f"{r.name}_latency_p50_ms_batch32": r.latency_p50_ms_batch32,
                       f"{r.name}_speedup_batch1": report["speedup"][r.name]["batch1"],
                       f"{r.name}_speedup_batch32": report["speedup"][r.name]["batch32"]})
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()])
    client.log_table(run_id, pd.DataFrame([asdict(r) for r in reports]), "compression/report.json")
    client.log_figure(run_id, figure, "compression/f1_vs_latency.png")
    client.log_artifact(run_id, str(html_path), "evaluation")
    client.log_dict(run_id, report, f"evaluation/{EVALUATION_FILE}")
    tracking.tag_compression_choice(client, run_id, report["chosen"], report["reason"])


def emit_kfp_metrics(report: dict[str, Any], metrics: Any) -> None:
    """The headline numbers on the KFP run page (a ``dsl.Metrics`` output)."""
    metrics.log_metric("f1_macro", round(float(report["f1_macro"]), 6))
    metrics.log_metric("fine_tuned_f1_macro", round(float(report["fine_tuned"]["f1_macro"]), 6))
    metrics.log_metric("baseline_bow_f1_macro", round(float(report["baseline_bag_of_words"]["f1_macro"]), 6))
    metrics.log_metric("speedup_batch1", round(float(report["speedup"][report["chosen"]]["batch1"]), 3))
    metrics.log_metric("gate_passed", float(report["gate"]["passed"]))
