"""Evaluate: score the held-out test rows through the same path serving uses, and gate promotion.

The model is fed the raw test columns (transform + network, as the MLflow
pyfunc does), so the reported metrics cover preprocessing too. The champion is
scored on the same rows, so the gate compares like with like.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import base64
import html
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from keel import storage, tracking
from keel.config import EvaluateConfig, GateConfig, RegisterConfig, SliceSpec
from keel.errors import EvaluationError
from keel.gate import GateDecision, decide, fairness_measured, require
from keel.settings import KeelSettings

EVALUATION_FILE = "evaluation.json"
REPORT_HTML = "report.html"
HEADLINE_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "roc_auc")
ROC_POINTS = 50
CALIBRATION_BINS = 10


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1, ROC-AUC, confusion matrix and (binary) ROC curve."""
    from sklearn import metrics

    predicted = probabilities.argmax(axis=1)
    everything = list(range(len(classes)))
    report: dict[str, Any] = {
        "accuracy": float(metrics.accuracy_score(labels, predicted)),
        "precision_macro": float(metrics.precision_score(labels, predicted, average="macro", zero_division=0)),
        "recall_macro": float(metrics.recall_score(labels, predicted, average="macro", zero_division=0)),
        "f1_macro": float(metrics.f1_score(labels, predicted, average="macro", zero_division=0)),
        "confusion_matrix": metrics.confusion_matrix(labels, predicted, labels=everything).tolist(),
        "classes": classes,
        "rows": int(len(labels)),
    }
    if len(np.unique(labels)) < 2:
        report["roc_auc"] = float("nan")
    elif len(classes) == 2:
        report["roc_auc"] = float(metrics.roc_auc_score(labels, probabilities[:, 1]))
        fpr, tpr, thresholds = metrics.roc_curve(labels, probabilities[:, 1])
        keep = np.unique(np.linspace(0, len(fpr) - 1, min(ROC_POINTS, len(fpr))).astype(int))
        # sklearn's first threshold is +inf, which JSON and KFP cannot carry
        report["roc_curve"] = {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist(),
                               "thresholds": np.minimum(thresholds[keep], 1.0).tolist(),
                               "positive_class": classes[1]}
    else:
        report["roc_auc"] = float(metrics.roc_auc_score(labels, probabilities, multi_class="ovr",
                                                        average="macro", labels=everything))
    return report


def calibration(labels: np.ndarray, probabilities: np.ndarray, bins: int = CALIBRATION_BINS) -> dict[str, list[float]]:
    """Reliability of the predicted class's probability: mean confidence against accuracy per bin.

    Confidence of the top class works for any number of classes; for binary
    models it is the usual reliability diagram folded at 0.5.
    """
    from sklearn.calibration import calibration_curve

    correct = (probabilities.argmax(axis=1) == labels).astype(int)
    confidence = probabilities.max(axis=1)
    if len(np.unique(correct)) < 2:
        return {"mean_predicted": [float(confidence.mean())], "fraction_correct": [float(correct.mean())]}
    fraction, mean = calibration_curve(correct, confidence, n_bins=bins, strategy="quantile")
    return {"mean_predicted": mean.tolist(), "fraction_correct": fraction.tolist()}


def precision_recall(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, list[float]] | None:
    """Binary precision-recall curve of the positive (second) class."""
    from sklearn import metrics

    if probabilities.shape[1] != 2 or len(np.unique(labels)) < 2:
        return None
    precision, recall, _ = metrics.precision_recall_curve(labels, probabilities[:, 1])
    keep = np.unique(np.linspace(0, len(precision) - 1, min(ROC_POINTS, len(precision))).astype(int))
    return {"precision": precision[keep].tolist(), "recall": recall[keep].tolist(),
            "average_precision": float(metrics.average_precision_score(labels, probabilities[:, 1]))}


def slice_groups(frame: pd.DataFrame, spec: SliceSpec) -> pd.Series:
    """Each row's slice label: a band ``[low, high)`` of ``bins``, or the column's own value."""
    if spec.column not in frame.columns:
        raise EvaluationError(f"evaluate.slices: column {spec.column!r} is not in the test data; "
                              f"columns are {list(frame.columns)}.")
    values = frame[spec.column]
    if spec.bins is None:
        return values.astype(str).fillna("missing")
    if not pd.api.types.is_numeric_dtype(values):
        raise EvaluationError(f"evaluate.slices: column {spec.column!r} has bins but is not numeric.")
    labels = [f"[{low:g}, {high:g})" for low, high in zip(spec.bins, spec.bins[1:])]
    banded = pd.cut(values, spec.bins, right=False, labels=labels)
    return banded.cat.add_categories(["outside bins"]).fillna("outside bins").astype(str)


def slice_metrics(groups: pd.Series, column: str, labels: np.ndarray, probabilities: np.ndarray,
                  classes: list[str], min_rows: int) -> list[dict[str, Any]]:
    """Headline metrics per slice; slices under ``min_rows`` are reported but not gated."""
    rows = []
    for name in sorted(groups.unique()):
        mask = (groups == name).to_numpy()
        report = classification_metrics(labels[mask], probabilities[mask], classes)
        rows.append({"column": column, "slice": name, "rows": int(mask.sum()), "gated": bool(mask.sum() >= min_rows),
                     **{metric: report[metric] for metric in HEADLINE_METRICS}})
    return rows


def fairness(groups: pd.Series, labels: np.ndarray, predicted: np.ndarray, positive: int,
             min_rows: int) -> dict[str, Any]:
    """Demographic parity difference (spread of positive-prediction rates) and equalized odds
    difference (larger spread of true- and false-positive rates) across the slices of one column."""
    selection, tpr, fpr = [], [], []
    for name in groups.unique():
        mask = (groups == name).to_numpy()
        if mask.sum() < min_rows:
            continue
        chosen, actual = predicted[mask] == positive, labels[mask] == positive
        selection.append(chosen.mean())
        if actual.any():
            tpr.append(chosen[actual].mean())
        if (~actual).any():
            fpr.append(chosen[~actual].mean())

    def spread(values: list[float]) -> float:
        return float(max(values) - min(values)) if len(values) > 1 else 0.0

    return {"demographic_parity_difference": spread(selection),
            "equalized_odds_difference": max(spread(tpr), spread(fpr)), "groups": len(selection)}


def full_report(raw_test: pd.DataFrame, labels: np.ndarray, probabilities: np.ndarray, classes: list[str],
                config: EvaluateConfig) -> dict[str, Any]:
    """Headline metrics, curves, slice metrics and fairness for one model on one test set."""
    report = classification_metrics(labels, probabilities, classes)
    report["calibration"] = calibration(labels, probabilities)
    curve = precision_recall(labels, probabilities)
    if curve is not None:
        report["pr_curve"] = curve
    if config.positive_class is not None and config.positive_class not in classes:
        raise EvaluationError(f"evaluate.positive_class {config.positive_class!r} is not a class; "
                              f"classes are {classes}.")
    positive = classes.index(config.positive_class) if config.positive_class else min(1, len(classes) - 1)
    report["slices"], report["fairness"] = [], {}
    for spec in config.slices:
        groups = slice_groups(raw_test, spec)
        report["slices"] += slice_metrics(groups, spec.column, labels, probabilities, classes, config.min_slice_rows)
        report["fairness"][spec.column] = fairness(groups, labels, probabilities.argmax(axis=1), positive,
                                                   config.min_slice_rows)
    report["positive_class"] = classes[positive]
    return report


def champion_probabilities(registry: RegisterConfig, raw_test: pd.DataFrame, classes: list[str],
                           settings: KeelSettings) -> tuple[str | None, np.ndarray | None, str]:
    """The champion scored on the same raw test rows (version, probabilities, note).

    When it cannot score them (other columns or classes), the gate falls back
    to the champion's recorded test metric, and the note says why.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from keel.predictor import PROBABILITY_PREFIX

    version = tracking.champion_version(tracking.mlflow_client(settings), registry.model_name)
    if version is None:
        return None, None, "no champion"
    try:
        model = mlflow.pyfunc.load_model(f"models:/{registry.model_name}/{version}")
        predicted = model.predict(raw_test.drop(columns=[c for c in raw_test.columns
                                                         if c not in model.metadata.get_input_schema().input_names()]))
        return version, predicted[[f"{PROBABILITY_PREFIX}{c}" for c in classes]].to_numpy(dtype=float), "rescored"
    except (MlflowException, KeyError, ValueError, OSError) as e:
        return (version, None,
                f"champion v{version} could not score this test split ({why_it_could_not_score(e)}); "
                "recorded metrics used")


def why_it_could_not_score(error: Exception) -> str:
    """One line for a gate reason: MLflow's schema error quotes the whole input table before what is wrong."""
    message = str(error)
    if message.startswith("Failed to enforce schema") and "Error: " in message:
        message = message.rsplit("Error: ", 1)[1]
    line = message.strip().splitlines()[0] if message.strip() else type(error).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def recorded_champion(registry: RegisterConfig, version: str, settings: KeelSettings) -> dict[str, Any] | None:
    client = tracking.mlflow_client(settings)
    run_id = client.get_model_version(registry.model_name, version).run_id
    recorded = client.get_run(run_id).data.metrics if run_id else {}
    value = recorded.get(f"test_{registry.promotion_metric}")
    return None if value is None else {registry.promotion_metric: value}


def rescored_champion(registry: RegisterConfig, settings: KeelSettings,
                      rescore: Callable[[Any], dict[str, Any]]) -> tuple[str | None, dict[str, Any] | None, str]:
    """The champion's metrics from ``rescore(its pyfunc's python model)`` on this run's held-out rows, or its
    recorded test metric when it cannot score them (another kind of model, other labels, missing files)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    version = tracking.champion_version(tracking.mlflow_client(settings), registry.model_name)
    if version is None:
        return None, None, "no champion"
    try:
        python_model = mlflow.pyfunc.load_model(f"models:/{registry.model_name}/{version}").unwrap_python_model()
        return version, rescore(python_model), "rescored"
    except (MlflowException, AttributeError, IndexError, KeyError, ValueError, OSError) as e:
        return (version, recorded_champion(registry, version, settings),
                f"champion v{version} could not score this split ({why_it_could_not_score(e)}); recorded metrics used")


def gate_with_rescored_champion(metrics: dict[str, float], default_metric: str, registry: RegisterConfig | None,
                                settings: KeelSettings, rescore: Callable[[Any], dict[str, Any]], tolerance: float,
                                rule: tuple[bool, str]) -> tuple[GateDecision, dict[str, Any] | None]:
    """The gate of a pipeline without slices: the promotion metric (higher is better) within ``tolerance`` of
    the champion rescored on this run's rows, and the pipeline's own ``rule`` (met, reason), such as a margin
    over its baseline. Returns the decision and the champion's metrics."""
    metric = registry.promotion_metric if registry else default_metric
    if metric not in metrics:
        raise EvaluationError(f"registry.promotion_metric {metric!r} is not one of {sorted(metrics)}.")
    version, champion, note = (rescored_champion(registry, settings, rescore) if registry
                               else (None, None, "no registry"))
    decision = decide(metrics, champion, version, metric, True, GateConfig(tolerance=tolerance))
    require(decision, *rule)
    if note not in ("rescored", "no champion", "no registry"):
        decision.reasons.append(note)
    return decision, champion


def gate_decision(report: dict[str, Any], raw_test: pd.DataFrame, labels: np.ndarray, classes: list[str],
                  config: EvaluateConfig, registry: RegisterConfig, settings: KeelSettings,
                  input_columns: Sequence[str]) -> tuple[GateDecision, dict[str, Any] | None]:
    """Score the champion on the same rows and apply the gate (``input_columns``: what the challenger reads;
    ``classes``: what it predicts); returns the decision and the champion's report."""
    if registry.promotion_metric not in HEADLINE_METRICS:
        raise EvaluationError(f"registry.promotion_metric {registry.promotion_metric!r} is not one of "
                              f"{list(HEADLINE_METRICS)}.")
    version, probabilities, note = champion_probabilities(registry, raw_test, classes, settings)
    champion = None
    if probabilities is not None:
        champion = full_report(raw_test, labels, probabilities, classes, config)
    elif version is not None:
        champion = recorded_champion(registry, version, settings)
    decision = decide(report, champion, version, registry.promotion_metric, registry.greater_is_better, config.gate)
    if note not in ("rescored", "no champion"):
        decision.reasons.append(note)
    if version is not None:
        _check_served_schema(decision, registry.model_name, version, list(input_columns), classes, config.gate)
    return decision, champion


def _check_served_schema(decision: GateDecision, model_name: str, version: str, input_columns: list[str],
                         classes: list[str], gate: GateConfig) -> None:
    """A model that reads other columns or predicts other classes than the champion changes the served API:
    the request schema requires every column it reads and refuses any other, and callers read its labels and
    ``probability_<class>`` fields. Promoted, each caller would break at once; unless the config allows it, a
    person promotes it once they are ready."""
    champion_inputs, champion_classes = tracking.served_schema(f"models:/{model_name}/{version}")
    changes = [f"{what} differ from champion v{version}'s ({change})" for what, change in (
        ("input columns", tracking.column_changes(champion_inputs, input_columns)),
        ("classes", tracking.column_changes(champion_classes, classes))) if change]
    if not changes:
        return
    if gate.allow_schema_changes:
        decision.reasons.append(f"ok: {'; '.join(changes)}; evaluate.gate.allow_schema_changes lets it through")
        return
    require(decision, False, f"{'; '.join(changes)}: every caller of the served model must change first; promote "
                             "it by hand once they have (keel models promote), or set "
                             "evaluate.gate.allow_schema_changes")


def evaluate(model_uri: str, splits_uri: str, output_uri: str, settings: KeelSettings,
             config: EvaluateConfig | None = None, registry: RegisterConfig | None = None,
             mlflow_run_id: str = "") -> dict[str, Any]:
    """Score the model at ``model_uri`` on the raw test split, slice it, and gate it against the champion.

    Publishes ``evaluation.json`` (with the gate decision the register stage
    applies), plots and an HTML report; logs them to ``mlflow_run_id`` if set.
    Without ``registry`` there is no champion to compare with.
    """
    from keel.predictor import Predictor  # torch: only where a model is scored

    config = config or EvaluateConfig()
    with storage.staged_output(output_uri, "evaluate", settings) as out, \
            tempfile.TemporaryDirectory(prefix="keel-evaluate-") as scratch:
        splits = storage.read_manifest(splits_uri, settings)
        raw_test = storage.read_parquet(splits["raw_test"], settings)
        predictor = Predictor.load(storage.download_directory(model_uri, Path(scratch) / "model", settings))
        labels = predictor.transform.encode_labels(raw_test[predictor.transform.target])
        report = full_report(raw_test, labels, predictor.predict_proba(raw_test), predictor.classes, config)
        champion = None
        if registry is not None:
            decision, champion = gate_decision(report, raw_test, labels, predictor.classes, config, registry, settings,
                                               predictor.transform.input_columns)
        else:
            decision = decide(report, None, None, "f1_macro", True, config.gate)
        report["gate"] = decision.to_dict()
        report["champion"] = champion
        out.write_json(EVALUATION_FILE, report)
        write_plots(report, out.dir)
        out.path(REPORT_HTML).write_text(report_html(report, out.dir))
        if mlflow_run_id:
            log_to_mlflow(report, out.dir, mlflow_run_id, settings)
        out.manifest.update({name: report[name] for name in HEADLINE_METRICS}, model_uri=model_uri,
                            evaluation=out.uri_of(EVALUATION_FILE), report_html=out.uri_of(REPORT_HTML),
                            rows=report["rows"], gate_passed=decision.passed, gate=decision.summary)
    return report


# ---- plots and reports ----------------------------------------------------------------------------------------

PLOTS = ("confusion_matrix.png", "roc_curve.png", "pr_curve.png", "calibration_curve.png")


def write_plots(report: dict[str, Any], directory: Path) -> list[Path]:
    """Confusion matrix, ROC, precision-recall and calibration plots as PNG files (those that apply)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    written = []
    for name in PLOTS:
        figure, axes = pyplot.subplots(figsize=(4.5, 4))
        if name == "confusion_matrix.png":
            matrix = np.asarray(report["confusion_matrix"])
            axes.imshow(matrix, cmap="Blues")
            for (row, col), count in np.ndenumerate(matrix):
                axes.text(col, row, str(count), ha="center", va="center")
            axes.set_xticks(range(len(report["classes"])), report["classes"], rotation=45)
            axes.set_yticks(range(len(report["classes"])), report["classes"])
            axes.set_xlabel("predicted"), axes.set_ylabel("actual")
        elif name == "roc_curve.png" and "roc_curve" in report:
            axes.plot(report["roc_curve"]["fpr"], report["roc_curve"]["tpr"])
            axes.plot([0, 1], [0, 1], linestyle=":")
            axes.set_xlabel("false positive rate"), axes.set_ylabel("true positive rate")
        elif name == "pr_curve.png" and "pr_curve" in report:
            axes.plot(report["pr_curve"]["recall"], report["pr_curve"]["precision"])
            axes.set_xlabel("recall"), axes.set_ylabel("precision")
        elif name == "calibration_curve.png":
            axes.plot(report["calibration"]["mean_predicted"], report["calibration"]["fraction_correct"], marker="o")
            axes.plot([0, 1], [0, 1], linestyle=":")
            axes.set_xlabel("mean confidence"), axes.set_ylabel("fraction correct")
        else:
            pyplot.close(figure)
            continue
        axes.set_title(name.removesuffix(".png").replace("_", " "))
        figure.tight_layout()
        figure.savefig(directory / name, format="png", dpi=90)
        pyplot.close(figure)
        written.append(directory / name)
    return written


def report_html(report: dict[str, Any], directory: Path, heading: str = "") -> str:
    """One self-contained page: headline metrics, gate decision, slices, fairness and the plots.

    A report with ``registered`` metrics (a check on labeled rows) shows them beside its own, under
    ``heading`` instead of the promotion gate's."""
    gate = report["gate"]
    registered = report.get("registered")
    heading = heading or f"Promotion gate: {'PASSED' if gate['passed'] else 'FAILED'}"
    parts = ["<html><head><meta charset='utf-8'><title>Keel evaluation</title></head><body>",
             f"<h2>{html.escape(heading)}</h2><ul>"]
    parts += [f"<li>{html.escape(reason)}</li>" for reason in gate["reasons"]]
    parts.append("</ul><h3>Metrics</h3><table border='1' cellpadding='4'>")
    if registered is not None:
        parts.append("<tr><th></th><th>now</th><th>registered</th></tr>")
    parts += [f"<tr><th>{name}</th><td>{report[name]:.4f}</td>"
              + ("" if registered is None else f"<td>{shown_metric(registered.get(name))}</td>") + "</tr>"
              for name in report.get("headline", HEADLINE_METRICS)]
    parts.append("</table>")
    if report.get("new_users", {}).get("users"):
        from keel.monitor.ranking import new_users_line

        parts.append(f"<h3>New users</h3><p>{html.escape(new_users_line(report['new_users']))}</p>")
    if report.get("slices"):
        parts.append("<h3>Slices</h3><table border='1' cellpadding='4'><tr><th>column</th><th>slice</th>"
                     "<th>rows</th>" + "".join(f"<th>{m}</th>" for m in HEADLINE_METRICS) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(str(s[k]))}</td>" for k in ("column", "slice", "rows"))
                  + "".join(f"<td>{s[m]:.4f}</td>" for m in HEADLINE_METRICS) + "</tr>" for s in report["slices"]]
        parts.append("</table><h3>Fairness</h3><ul>")
        parts += [f"<li>{html.escape(column)}: " + (
                  "not measured (fewer than two of its slices have evaluate.min_slice_rows rows)"
                  if not fairness_measured(m) else f"demographic parity difference "
                  f"{m['demographic_parity_difference']:.4f}, equalized odds difference "
                  f"{m['equalized_odds_difference']:.4f}") + "</li>" for column, m in report["fairness"].items()]
        parts.append("</ul>")
    for name in PLOTS:
        if (directory / name).exists():
            encoded = base64.b64encode((directory / name).read_bytes()).decode()
            parts.append(f"<img alt='{name}' src='data:image/png;base64,{encoded}'/>")
    return "".join(parts) + "</body></html>"


def shown_metric(value: Any) -> str:
    """A metric to four places, or n/a where there is none (a model registered without it)."""
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a"


def metric_key(*parts: str) -> str:
    """MLflow metric names allow letters, digits and ``_-. /:`` only."""
    return "/".join(re.sub(r"[^\w.\- ]", "_", part) for part in parts)


def log_to_mlflow(report: dict[str, Any], directory: Path, run_id: str, settings: KeelSettings) -> None:
    """Plots, report, slice and fairness metrics and the gate decision on the pipeline's MLflow run."""
    from mlflow.entities import Metric

    client = tracking.mlflow_client(settings)
    now = int(time.time() * 1000)
    values = {metric_key("slice", s["column"], s["slice"], m): s[m] for s in report["slices"]
              for m in HEADLINE_METRICS}
    values.update({metric_key("fairness", column, name): measures[name]
                   for column, measures in report["fairness"].items()
                   for name in ("demographic_parity_difference", "equalized_odds_difference")})
    values["gate_passed"] = float(report["gate"]["passed"])
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items() if np.isfinite(v)])
    for name in (*PLOTS, REPORT_HTML):
        if (directory / name).exists():
            client.log_artifact(run_id, str(directory / name), "evaluation")
    client.log_dict(run_id, report["gate"], "evaluation/gate.json")
    client.set_tag(run_id, tracking.GATE_TAG, ("passed" if report["gate"]["passed"] else "failed"))


def emit_kfp_metrics(report: dict[str, Any], metrics: Any, classification: Any) -> None:
    """Fill KFP ``Metrics`` and ``ClassificationMetrics`` artifacts so the Kubeflow UI shows them."""
    for name in HEADLINE_METRICS:
        if np.isfinite(report[name]):
            metrics.log_metric(name, round(float(report[name]), 6))
    for column, measures in report.get("fairness", {}).items():
        for name in ("demographic_parity_difference", "equalized_odds_difference"):
            metrics.log_metric(f"{name}[{column}]", round(float(measures[name]), 6))
    if "gate" in report:
        metrics.log_metric("gate_passed", float(report["gate"]["passed"]))
    classification.log_confusion_matrix(report["classes"], report["confusion_matrix"])
    if "roc_curve" in report:
        curve = report["roc_curve"]
        classification.log_roc_curve(curve["fpr"], curve["tpr"], curve["thresholds"])
