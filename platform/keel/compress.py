"""Compress: smaller or faster variants of the trained model, measured side by side, one chosen.

Every variant is scored the way it will be served (raw test rows through the
transform and the network) and timed on the same CPU in the same run, so the
report compares like with like. A policy then picks the variant to register:
the fastest one within the accuracy and latency bounds the config sets.
"""

from __future__ import annotations

import base64
import copy
import html
import io
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from keel import storage, tracking
from keel.config import CompressConfig
from keel.data.preprocess import LABEL, TRANSFORM_FILE, feature_matrix
from keel.errors import CompressionError
from keel.predictor import Predictor
from keel.settings import KeelSettings
from keel.train.loop import LossFn, evaluate_epoch, train_epoch
from keel.train.model import SPEC_FILE, MLPClassifier, MLPSpec, parameter_count, quantize_int8, save_model

BASELINE = "baseline"
REPORT_FILE = "report.json"
REPORT_HTML = "report.html"
PLOT_FILE = "accuracy_vs_latency.png"
VARIANTS_DIR = "variants"
LATENCY_BATCHES = (1, 32)
FINETUNE_BATCH = 32
LATENCY_TIE = 1.05


@dataclass(frozen=True)
class Split:
    features: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class VariantReport:
    """What the policy and the report need to know of one variant."""

    name: str
    accuracy: float
    f1_macro: float
    accuracy_drop: float
    parameters: int
    nonzero_parameters: int
    size_bytes: int
    latency_p50_ms_batch1: float
    latency_p50_ms_batch32: float
    f1_macro_drop: float = 0.0

    def latency_ms(self, batch: int) -> float:
        return self.latency_p50_ms_batch1 if batch == 1 else self.latency_p50_ms_batch32


# ---- measurements ---------------------------------------------------------------------------------------------

def serialized_bytes(model: nn.Module) -> int:
    """Size of the weights file as Keel saves it (a state dict)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def latency_p50_ms(model: nn.Module, input_dim: int, batch: int, repeats: int) -> float:
    """Median forward time of a random batch on one CPU thread (see :func:`p50_ms_one_thread`)."""
    features = torch.randn(batch, input_dim)
    return p50_ms_one_thread(lambda: model(features), repeats)


def p50_ms_one_thread(call: Callable[[], Any], repeats: int, warmup: int | None = None) -> float:
    """Median time of ``call()`` on one CPU thread: what one serving replica's request costs, without
    noise from the other core. ``warmup`` calls first (default: a tenth of ``repeats``, at least 10)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timings = []
        with torch.inference_mode():
            for _ in range(max(10, repeats // 10) if warmup is None else warmup):  # allocator, packed weights
                call()
            for _ in range(repeats):
                started = time.perf_counter()
                call()
                timings.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(timings) * 1000


def nonzero_parameters(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


def score(model: nn.Module, predictor: Predictor, raw_test: pd.DataFrame) -> tuple[float, float]:
    """Accuracy and macro-F1 on raw test rows, through the serving path."""
    from sklearn.metrics import accuracy_score, f1_score

    labels = predictor.transform.encode_labels(raw_test[predictor.transform.target])
    predicted = Predictor(model, predictor.transform).predict_proba(raw_test).argmax(axis=1)
    return float(accuracy_score(labels, predicted)), float(f1_score(labels, predicted, average="macro"))


# ---- variants -------------------------------------------------------------------------------------------------

def fit_best(model: nn.Module, train: Split, val: Split, epochs: int, config: CompressConfig,
             loss_fn: LossFn | None = None, after_step: Callable[[], None] | None = None) -> nn.Module:
    """Train for ``epochs`` and keep the weights with the lowest validation loss (the starting ones
    included, so fine-tuning never makes a variant worse on validation)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    best_loss, best_state = evaluate_epoch(model, val.features, val.labels)[0], copy.deepcopy(model.state_dict())
    for _ in range(epochs):
        train_epoch(model, optimizer, train.features, train.labels, FINETUNE_BATCH, generator, loss_fn, after_step)
        loss = evaluate_epoch(model, val.features, val.labels)[0]
        if loss < best_loss:
            best_loss, best_state = loss, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model.eval()


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def prune_unstructured(teacher: nn.Module, train: Split, val: Split, config: CompressConfig) -> nn.Module:
    """Global magnitude pruning: the smallest ``prune_amount`` of all weights set to zero, then fine-tuned
    with the zeros held (the mask is re-applied after every step)."""
    model = copy.deepcopy(teacher)
    weights = [layer.weight for layer in linear_layers(model)]
    magnitudes = torch.cat([w.detach().abs().flatten() for w in weights])
    threshold = torch.kthvalue(magnitudes, max(1, int(config.prune_amount * len(magnitudes)))).values
    masks = [(w.detach().abs() > threshold).to(w.dtype) for w in weights]

    def apply_masks() -> None:
        with torch.no_grad():
            for weight, mask in zip(weights, masks):
                weight.mul_(mask)

    apply_masks()
    return fit_best(model, train, val, config.finetune_epochs, config, after_step=apply_masks)


def prune_structured(teacher: MLPClassifier, spec: MLPSpec, train: Split, val: Split,
                     config: CompressConfig) -> tuple[nn.Module, MLPSpec]:
    """Remove whole hidden units (smallest L2 norm of incoming weights), then fine-tune the smaller net."""
    layers = linear_layers(teacher)
    kept_sizes = [max(1, round(size * config.keep_units)) for size in spec.hidden_sizes]
    small_spec = spec.model_copy(update={"hidden_sizes": kept_sizes})
    student = MLPClassifier(small_spec)
    keep_in = torch.arange(spec.input_dim)
    with torch.no_grad():
        for index, (source, target) in enumerate(zip(layers, linear_layers(student))):
            if index < len(kept_sizes):
                norms = source.weight[:, keep_in].norm(dim=1)
                keep_out = torch.sort(torch.topk(norms, kept_sizes[index]).indices).values
            else:
                keep_out = torch.arange(source.out_features)
            target.weight.copy_(source.weight[keep_out][:, keep_in])
            target.bias.copy_(source.bias[keep_out])
            keep_in = keep_out
    return fit_best(student, train, val, config.finetune_epochs, config), small_spec


def distill(teacher: nn.Module, spec: MLPSpec, train: Split, val: Split,
            config: CompressConfig) -> tuple[nn.Module, MLPSpec]:
    """Train a smaller student on the teacher's softened outputs plus the true labels (Hinton et al.)."""
    sizes = config.student_hidden_sizes or [max(2, size // 4) for size in spec.hidden_sizes]
    student_spec = spec.model_copy(update={"hidden_sizes": sizes})
    torch.manual_seed(config.seed)
    student = MLPClassifier(student_spec)
    with torch.no_grad():
        teacher_logits = teacher.eval()(train.features)
    temperature, alpha = config.temperature, config.distill_alpha

    def loss_fn(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        soft = nn.functional.kl_div(nn.functional.log_softmax(logits / temperature, dim=1),
                                    nn.functional.softmax(teacher_logits[rows] / temperature, dim=1),
                                    reduction="batchmean") * temperature ** 2
        return alpha * soft + (1 - alpha) * nn.functional.cross_entropy(logits, train.labels[rows])

    return fit_best(student, train, val, config.distill_epochs, config, loss_fn=loss_fn), student_spec


def build_variants(teacher: MLPClassifier, spec: MLPSpec, train: Split, val: Split,
                   config: CompressConfig) -> dict[str, tuple[nn.Module, MLPSpec]]:
    """The baseline plus one variant per configured method, in a fixed order."""
    torch.manual_seed(config.seed)
    variants: dict[str, tuple[nn.Module, MLPSpec]] = {BASELINE: (teacher, spec)}
    if "prune_unstructured" in config.methods:
        variants["pruned_unstructured"] = (prune_unstructured(teacher, train, val, config), spec)
    if "prune_structured" in config.methods:
        variants["pruned_structured"] = prune_structured(teacher, spec, train, val, config)
    if "int8" in config.methods:
        variants["int8"] = (quantize_int8(copy.deepcopy(teacher), config.int8_min_layer_weights),
                            spec.model_copy(update={"quantized": True,
                                                    "quantize_min_weights": config.int8_min_layer_weights}))
    if "distill" in config.methods:
        variants["distilled"] = distill(teacher, spec, train, val, config)
    return variants


def measure(name: str, model: nn.Module, spec: MLPSpec, predictor: Predictor, raw_test: pd.DataFrame,
            baseline_accuracy: float | None, repeats: int, baseline_f1: float | None = None) -> VariantReport:
    accuracy, f1 = score(model, predictor, raw_test)
    latencies = [latency_p50_ms(model, spec.input_dim, batch, repeats) for batch in LATENCY_BATCHES]
    if spec.quantized:  # packed int8 weights are not parameters: count the float network they came from
        parameters = nonzero = parameter_count(MLPClassifier(spec.model_copy(update={"quantized": False})))
    else:
        parameters, nonzero = parameter_count(model), nonzero_parameters(model)
    return VariantReport(
        name=name, accuracy=accuracy, f1_macro=f1,
        accuracy_drop=0.0 if baseline_accuracy is None else baseline_accuracy - accuracy,
        f1_macro_drop=0.0 if baseline_f1 is None else baseline_f1 - f1,
        parameters=parameters, nonzero_parameters=nonzero, size_bytes=serialized_bytes(model),
        latency_p50_ms_batch1=latencies[0], latency_p50_ms_batch32=latencies[1])


# ---- policy ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Policy:
    """Which variant may be registered: ``metric`` lost by at most ``max_drop``, latency within budget."""

    metric: str  # "accuracy" or "f1_macro": a VariantReport field with a ``<metric>_drop`` twin
    max_drop: float
    latency_budget_ms: float
    batch: int
    settings: str  # the config fields that set the bounds, named in the error when nothing qualifies


def choose_variant(reports: list[VariantReport], config: CompressConfig) -> tuple[str, str]:
    """:func:`choose` with the medical pipeline's accuracy policy from ``config``."""
    return choose(reports, Policy("accuracy", config.max_accuracy_drop, config.latency_budget_ms,
                                  config.policy_batch_size, "compress.max_accuracy_drop and compress.latency_budget_ms"))


def choose(reports: list[VariantReport], policy: Policy) -> tuple[str, str]:
    """The fastest variant (at ``policy.batch``) within ``max_drop`` and ``latency_budget_ms``;
    the reason names the winner's numbers and why each other variant lost."""
    batch, metric = policy.batch, policy.metric

    def drop(report: VariantReport) -> float:
        return float(getattr(report, f"{metric}_drop"))

    rejected, eligible = [], []
    for report in reports:
        latency = report.latency_ms(batch)
        if drop(report) > policy.max_drop + 1e-12:
            rejected.append(f"{report.name}: {metric} drop {drop(report):.4f} > {policy.max_drop}")
        elif latency > policy.latency_budget_ms:
            rejected.append(f"{report.name}: {latency:.3f} ms > budget {policy.latency_budget_ms} ms")
        else:
            eligible.append(report)
    if not eligible:
        raise CompressionError(f"no model variant meets {policy.settings} (at batch {batch}): " + "; ".join(rejected)
                               + ". Relax a bound or add methods.")
    # Within 5% of the fastest is a tie (timer noise): the smaller drop, then the smaller file wins.
    fastest = min(r.latency_ms(batch) for r in eligible)
    chosen = min((r for r in eligible if r.latency_ms(batch) <= fastest * LATENCY_TIE),
                 key=lambda r: (drop(r), r.size_bytes, r.latency_ms(batch)))
    slower = [f"{r.name}: slower ({r.latency_ms(batch):.3f} ms)" for r in eligible if r is not chosen]
    budget = f" and within the {policy.latency_budget_ms} ms budget" if policy.latency_budget_ms != float("inf") else ""
    reason = (f"{chosen.name}: fastest at batch {batch} ({chosen.latency_ms(batch):.3f} ms p50) with {metric} "
              f"drop {drop(chosen):.4f} <= {policy.max_drop}{budget}; " + "; ".join(slower + rejected))
    return chosen.name, reason.rstrip("; ")


# ---- report ---------------------------------------------------------------------------------------------------

def plot_accuracy_vs_latency(reports: list[VariantReport], chosen: str, metric: str = "accuracy") -> Any:
    """``metric`` (accuracy or f1_macro) against batch-1 latency, one labelled point per variant."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 4))
    for report in reports:
        axes.scatter(report.latency_p50_ms_batch1, getattr(report, metric), s=60 if report.name == chosen else 30,
                     marker="*" if report.name == chosen else "o")
        axes.annotate(report.name, (report.latency_p50_ms_batch1, getattr(report, metric)), fontsize=8,
                      xytext=(4, 4), textcoords="offset points")
    axes.set_xlabel("latency p50 at batch 1 (ms, 1 CPU thread)")
    axes.set_ylabel(f"test {metric}")
    axes.set_title("Compressed variants (star: registered)")
    figure.tight_layout()
    return figure


def report_html(reports: list[VariantReport], chosen: str, reason: str, png: bytes) -> str:
    """A self-contained page (table, plot, decision) for the KFP UI's HTML viewer."""
    columns = list(asdict(reports[0]))
    rows = "".join(
        "<tr" + (" style='font-weight:bold'" if r.name == chosen else "") + ">"
        + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in asdict(r).values()) + "</tr>" for r in reports)
    return ("<html><head><meta charset='utf-8'><title>Keel compression report</title></head><body>"
            "<h2>Compressed variants</h2><table border='1' cellpadding='4'>"
            f"<tr>{''.join(f'<th>{html.escape(c)}</th>' for c in columns)}</tr>{rows}</table>"
            f"<p><b>Registered:</b> {html.escape(chosen)}. {html.escape(reason)}</p>"
            f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}'/></body></html>")


def write_report_pages(directory: Path, reports: list[VariantReport], chosen: str, reason: str, metric: str) -> Any:
    """The plot (PNG) and the HTML page in ``directory``; returns the figure for MLflow."""
    figure = plot_accuracy_vs_latency(reports, chosen, metric)
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    (directory / PLOT_FILE).write_bytes(png.getvalue())
    (directory / REPORT_HTML).write_text(report_html(reports, chosen, reason, png.getvalue()))
    return figure


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _log_to_mlflow(settings: KeelSettings, run_id: str, reports: list[VariantReport], chosen: str, reason: str,
                   figure: Any) -> None:
    client = tracking.mlflow_client(settings)
    client.log_table(run_id, pd.DataFrame([asdict(r) for r in reports]), "compression/report.json")
    client.log_figure(run_id, figure, f"compression/{PLOT_FILE}")
    tracking.tag_compression_choice(client, run_id, chosen, reason)


# ---- the stage ------------------------------------------------------------------------------------------------

def _split(uri: str, feature_names: list[str], settings: KeelSettings) -> Split:
    frame = storage.read_parquet(uri, settings)
    return Split(torch.from_numpy(feature_matrix(frame, feature_names)),
                 torch.from_numpy(frame[LABEL].to_numpy(dtype=np.int64, copy=True)))


def compress(model_uri: str, splits_uri: str, config: CompressConfig, output_uri: str, settings: KeelSettings,
             mlflow_run_id: str = "") -> dict[str, Any]:
    """Build, measure and choose among variants of the model at ``model_uri``; publish all of them.

    The manifest's ``model_uri`` is the chosen variant's directory, in the same
    layout as a train output, so evaluate, register and serve take it as is.
    """
    with storage.staged_output(output_uri, "compress", settings) as out, \
            tempfile.TemporaryDirectory(prefix="keel-compress-") as scratch:
        teacher_dir = storage.download_directory(model_uri, Path(scratch) / "model", settings)
        predictor = Predictor.load(teacher_dir)
        teacher = predictor.model
        assert isinstance(teacher, MLPClassifier)
        spec = MLPSpec.model_validate_json((teacher_dir / SPEC_FILE).read_text())
        splits = storage.read_manifest(splits_uri, settings)
        names = predictor.transform.feature_names
        train, val = (_split(splits["splits"][name], names, settings) for name in ("train", "val"))
        raw_test = storage.read_parquet(splits["raw_test"], settings)

        reports = []
        baseline_accuracy: float | None = None
        baseline_f1: float | None = None
        for name, (model, variant_spec) in build_variants(teacher, spec, train, val, config).items():
            report = measure(name, model, variant_spec, predictor, raw_test, baseline_accuracy,
                             config.latency_repeats, baseline_f1)
            if baseline_accuracy is None:
                baseline_accuracy, baseline_f1 = report.accuracy, report.f1_macro
            reports.append(report)
            variant_dir = out.dir / VARIANTS_DIR / name
            save_model(model, variant_spec, variant_dir)
            (variant_dir / TRANSFORM_FILE).write_bytes((teacher_dir / TRANSFORM_FILE).read_bytes())
            # each variant is a complete model directory, readable on its own like a train output
            (variant_dir / storage.MANIFEST).write_text(json.dumps({"stage": "compress", **asdict(report)}))

        chosen, reason = choose_variant(reports, config)
        figure = write_report_pages(out.dir, reports, chosen, reason, "accuracy")
        out.write_json(REPORT_FILE, {"variants": [asdict(r) for r in reports], "chosen": chosen, "reason": reason,
                                     "policy": config.model_dump(include={"max_accuracy_drop", "latency_budget_ms",
                                                                          "policy_batch_size"})})
        if mlflow_run_id:
            _log_to_mlflow(settings, mlflow_run_id, reports, chosen, reason, figure)
        out.manifest.update(chosen=chosen, reason=reason, model_uri=out.uri_of(f"{VARIANTS_DIR}/{chosen}"),
                            report=out.uri_of(REPORT_FILE), report_html=out.uri_of(REPORT_HTML),
                            variants={r.name: asdict(r) for r in reports})
    return out.manifest
