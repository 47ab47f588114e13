import numpy as np
import pytest
from kfp.dsl import ClassificationMetrics, Metrics

from keel.evaluate import classification_metrics, emit_kfp_metrics
from tests.conftest import SMALL_CONTRACT, small_frame


def test_binary_metrics_match_a_hand_count() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    probabilities = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    report = classification_metrics(labels, probabilities, ["no", "yes"])
    assert report["accuracy"] == pytest.approx(3 / 5)
    assert report["confusion_matrix"] == [[1, 1], [1, 2]]
    assert report["precision_macro"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert report["roc_auc"] == pytest.approx(5 / 6)
    curve = report["roc_curve"]
    assert curve["fpr"][0] == 0 and curve["tpr"][-1] == 1 and max(curve["thresholds"]) <= 1


def test_multiclass_uses_one_vs_rest_auc() -> None:
    labels = np.array([0, 1, 2, 0, 1, 2])
    probabilities = np.eye(3)[labels] * 0.9 + 0.1 / 3
    report = classification_metrics(labels, probabilities, ["a", "b", "c"])
    assert report["accuracy"] == 1 and report["roc_auc"] == 1 and "roc_curve" not in report


def test_kfp_artifacts_carry_the_metrics(tmp_path) -> None:
    labels = np.array([0, 1, 1, 0])
    report = classification_metrics(labels, np.array([[0.8, 0.2], [0.3, 0.7], [0.1, 0.9], [0.6, 0.4]]), ["n", "p"])
    metrics = Metrics(name="metrics", uri=str(tmp_path / "m"))
    classification = ClassificationMetrics(name="cm", uri=str(tmp_path / "c"))
    emit_kfp_metrics(report, metrics, classification)
    assert metrics.metadata["accuracy"] == 1.0 and metrics.metadata["f1_macro"] == 1.0
    matrix = classification.metadata["confusionMatrix"]
    assert [c["displayName"] for c in matrix["annotationSpecs"]] == ["n", "p"]
    assert matrix["rows"] == [{"row": [2, 0]}, {"row": [0, 2]}]
    assert classification.metadata["confidenceMetrics"]


def test_fairness_by_hand_count() -> None:
    import pandas as pd

    from keel.evaluate import fairness

    groups = pd.Series(["a"] * 4 + ["b"] * 4)
    labels = np.array([1, 1, 0, 0, 1, 1, 0, 0])
    predicted = np.array([1, 1, 1, 0, 1, 0, 0, 0])
    measures = fairness(groups, labels, predicted, positive=1, min_rows=1)
    # selection rates a 3/4, b 1/4; TPR a 1, b 1/2; FPR a 1/2, b 0
    assert measures["demographic_parity_difference"] == pytest.approx(0.5)
    assert measures["equalized_odds_difference"] == pytest.approx(0.5)
    assert fairness(groups, labels, predicted, 1, min_rows=5)["groups"] == 0


def test_fairness_over_a_column_with_one_slice_big_enough_reads_not_measured_in_the_gate_and_report(
        tmp_path) -> None:
    """Its gaps are 0 with one slice to compare, which a fairness bound took as "ok"."""
    import pandas as pd

    from keel.config import EvaluateConfig, GateConfig, SliceSpec
    from keel.evaluate import full_report, report_html
    from keel.gate import decide

    raw = pd.DataFrame({"band": ["a"] * 6 + ["b"] * 2})
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    probabilities = np.array([[0.8, 0.2], [0.3, 0.7]] * 4)
    config = EvaluateConfig(slices=[SliceSpec(column="band")], min_slice_rows=5,
                            gate=GateConfig(max_equalized_odds_difference=0.1))
    report = full_report(raw, labels, probabilities, ["n", "p"], config)
    report["gate"] = decide(report, None, None, "f1_macro", True, config.gate).to_dict()
    assert report["gate"]["passed"] and not any("equalized_odds" in r for r in report["gate"]["reasons"])
    assert "fairness over band not measured: 1 of its slices has" in " ".join(report["gate"]["reasons"])
    assert "<li>band: not measured (fewer than two of its slices" in report_html(report, tmp_path)


def test_slices_band_a_numeric_column_and_name_a_missing_one() -> None:
    import pandas as pd

    from keel.config import SliceSpec
    from keel.errors import EvaluationError
    from keel.evaluate import slice_groups, slice_metrics

    frame = pd.DataFrame({"age": [20, 35, 50, 70, 120]})
    groups = slice_groups(frame, SliceSpec(column="age", bins=[0, 40, 100]))
    assert groups.tolist() == ["[0, 40)", "[0, 40)", "[40, 100)", "[40, 100)", "outside bins"]
    rows = slice_metrics(groups, "age", np.array([0, 1, 1, 0, 1]),
                         np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6], [0.5, 0.5]]), ["n", "p"], 2)
    by_slice = {r["slice"]: r for r in rows}
    assert by_slice["[0, 40)"]["accuracy"] == 1 and by_slice["[40, 100)"]["accuracy"] == 0.5
    assert by_slice["[0, 40)"]["gated"] and not by_slice["outside bins"]["gated"]
    with pytest.raises(EvaluationError, match="column 'sex' is not in the test data"):
        slice_groups(frame, SliceSpec(column="sex"))


@pytest.mark.parametrize("section, message", [
    ({"slices": [{"column": "size", "bins": [0, 50, 100]}, {"column": "age"}]},
     r"evaluate.slices.1.column: 'age' is not a contract column; use one of \['colour', "),
    ({"slices": [{"column": "colour", "bins": [0, 1]}]},
     r"evaluate.slices.0.column: 'colour' is a category column, so it has no"),
    ({"positive_class": "maybe"},
     r"evaluate.positive_class: 'maybe' is not one of the target 'outcome''s allowed values \['yes', 'no'\]"),
])
def test_evaluation_outside_the_contract_fails_when_the_config_is_read(section: dict, message: str) -> None:
    from keel.errors import ConfigError
    from tests.stages import small_config

    assert small_config(evaluate={"slices": [{"column": "colour"}, {"column": "size", "bins": [0, 50]}],
                                  "positive_class": "yes"})
    with pytest.raises(ConfigError, match=message):
        small_config(evaluate=section)


def test_evaluate_stage_writes_plots_report_and_gate(settings, tmp_path) -> None:
    import json
    from pathlib import Path

    from tests.stages import run_stages, write_small_source

    uris = run_stages(settings, "run-e", write_small_source(tmp_path))
    evaluation = json.loads((Path(uris["evaluate"]) / "evaluation.json").read_text())
    assert evaluation["gate"]["passed"] and evaluation["gate"]["champion_version"] is None
    assert len(evaluation["calibration"]["mean_predicted"]) >= 1 and "pr_curve" in evaluation
    for name in ("confusion_matrix.png", "roc_curve.png", "pr_curve.png", "calibration_curve.png"):
        assert (Path(uris["evaluate"]) / name).stat().st_size > 1000
    assert "Promotion gate: PASSED" in (Path(uris["evaluate"]) / "report.html").read_text()


def test_a_challenger_reading_other_columns_than_the_champion_waits_for_a_person(
        settings, tmp_path) -> None:
    """A champion trained with a column the new contract leaves out (an identifier, say). It cannot score the
    new split, and says so in one line: MLflow's schema error quotes the whole test table, which read as the
    gate's reason in `keel run`'s summary and in MLflow."""
    import json
    from pathlib import Path

    from tests.stages import register_small_model, run_stages, small_config, write_small_source

    register_small_model(settings, "run-v1", epochs=5)
    contract = {**SMALL_CONTRACT, "columns": {k: v for k, v in SMALL_CONTRACT["columns"].items() if k != "weight"}}
    source = write_small_source(tmp_path)
    uris = run_stages(settings, "run-v2", source, epochs=5, config=small_config(contract=contract))
    gate = json.loads((Path(uris["evaluate"]) / "evaluation.json").read_text())["gate"]
    note = next(reason for reason in gate["reasons"] if "could not score" in reason)
    assert note == ("champion v1 could not score this test split (Model is missing inputs ['weight'].); "
                    "recorded metrics used"), note
    assert gate["champion_version"] == "1" and any("vs champion v1" in reason for reason in gate["reasons"])
    # Served, v1's request schema requires weight and v2's refuses it: promoted by the gate, every caller's
    # requests would be refused at once, so the gate leaves it to a person unless the config allows it.
    changed = ("input columns differ from champion v1's (drops weight): every caller of the served model must "
               "change first")
    assert not gate["passed"] and any(failure.startswith(changed) for failure in gate["failures"]), gate
    allowed = small_config(contract=contract, evaluate={"gate": {"allow_schema_changes": True, "tolerance": 1}})
    gate = json.loads((Path(run_stages(settings, "run-v3", source, epochs=5, config=allowed)["evaluate"])
                       / "evaluation.json").read_text())["gate"]
    assert gate["passed"] and "ok: input columns differ from champion v1's (drops weight); " \
        "evaluate.gate.allow_schema_changes lets it through" in gate["reasons"], gate
    same = json.loads((Path(run_stages(settings, "run-v4", source, epochs=5)["evaluate"])
                       / "evaluation.json").read_text())["gate"]
    assert not any("input columns" in reason or "classes" in reason for reason in same["reasons"]), same
    # labels renamed: callers reading `probability_yes` would find `probability_y`
    renamed = tmp_path / "renamed.csv"
    small_frame(200).assign(outcome=lambda f: f["outcome"].str[0]).to_csv(renamed, index=False)
    relabeled = {**SMALL_CONTRACT, "columns": {**SMALL_CONTRACT["columns"],
                                               "outcome": {"dtype": "category", "allowed": ["y", "n"]}}}
    gate = json.loads((Path(run_stages(settings, "run-v5", renamed, epochs=5, config=small_config(
        contract=relabeled, evaluate={"positive_class": "y"}))["evaluate"]) / "evaluation.json").read_text())["gate"]
    assert any(failure.startswith("classes differ from champion v1's (adds n, y; drops no, yes): every caller")
               for failure in gate["failures"]), gate


def test_a_positive_class_written_unquoted_in_yaml_is_read_as_the_label_it_names(tmp_path) -> None:
    """`positive_class: 1` for 0/1 labels is the class "1"; `positive_class: yes` is YAML's boolean true, and the
    error says to quote it."""
    import yaml

    from keel.errors import ConfigError
    from tests.stages import small_config

    numeric = {**SMALL_CONTRACT, "columns": {**SMALL_CONTRACT["columns"],
                                             "outcome": {"dtype": "int", "allowed": [0, 1]}}}
    config = small_config(contract=numeric, evaluate=yaml.safe_load("positive_class: 1"))
    assert config.evaluate.positive_class == "1"
    with pytest.raises(ConfigError, match=r"evaluate.positive_class: Input should be a valid string \(YAML reads "
                                          r"yes, no, .* unquoted as booleans: quote it, 'yes'\)"):
        small_config(evaluate=yaml.safe_load("positive_class: yes"))
