"""A registered model checked on labeled rows against what it was registered on (real MLflow on SQLite)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from keel import storage, tracking
from keel.config import PipelineConfig
from keel.cli.evaluate import DEGRADED_EXIT_CODE
from keel.errors import ConfigError, DataError, KeelError
from keel.monitor.performance import PerformanceConfig, check_performance, evaluate_config_from_params
from keel.monitor.verdict import EVALUATED_VERSION_TAG, PERFORMANCE_FILE, PERFORMANCE_TAG
from keel.registry import flatten_params, register
from keel.settings import KeelSettings
from tests.conftest import SMALL_CONTRACT, small_frame
from tests.stages import run_stages, small_config, write_small_source
from tests.processes import keel

MODEL = "models:/small-model@champion"
EVALUATE = {"slices": [{"column": "colour"}, {"column": "size", "bins": [0, 10, 100]}], "min_slice_rows": 5,
            "gate": {"slice_tolerance": 0.1, "max_equalized_odds_difference": 0.9}}


def training_params(config: PipelineConfig) -> dict:
    return config.model_dump(mode="json", exclude={"contract"})  # as the register component logs them


@pytest.fixture
def registered(settings: KeelSettings) -> MlflowClient:
    """small-model v1, trained, evaluated with colour and size slices, and registered with its config."""
    config = small_config(evaluate=EVALUATE)
    uris = run_stages(settings, "r1", write_small_source(settings.home.parent, rows=400), config=config)
    register(uris["train"], uris["evaluate"], uris["ingest"], uris["preprocess"], config.registry,
             training_params(config), "r1", "small", uris["register"], settings)
    return tracking.mlflow_client(settings)


def labeled_table(directory: Path, frame: pd.DataFrame, name: str = "labeled.csv") -> str:
    frame.to_csv(directory / name, index=False)
    return str(directory / name)


def checks(client: MlflowClient) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string=f"tags.`{EVALUATED_VERSION_TAG}` = '1'")


def test_the_config_a_version_was_trained_with_comes_back_from_its_run_params() -> None:
    config = small_config(evaluate={**EVALUATE, "positive_class": "yes"})
    params = flatten_params(training_params(config))
    assert evaluate_config_from_params(params, "v1") == config.evaluate
    assert evaluate_config_from_params({"train.dropout": "0.1"}, "v1") == PipelineConfig.model_fields[
        "evaluate"].default  # a run without evaluate params: the defaults
    # 0/1 labels: the param '1' is the class named "1", not the number (`keel evaluate` refused every such model)
    numeric = small_config(contract={**SMALL_CONTRACT, "columns": {
        **SMALL_CONTRACT["columns"], "outcome": {"dtype": "int", "allowed": [0, 1]}}},
        evaluate={**EVALUATE, "positive_class": "1"})
    assert evaluate_config_from_params(flatten_params(training_params(numeric)), "v1") == numeric.evaluate


def test_rows_like_its_test_split_pass_with_its_own_slices_and_the_check_is_recorded(
        registered: MlflowClient, settings: KeelSettings, tmp_path: Path) -> None:
    frame = small_frame(300, seed=3)
    frame.loc[:24, "outcome"] = None  # labels not in yet
    manifest = check_performance(MODEL, labeled_table(tmp_path, frame), str(tmp_path / "out"), settings)
    assert manifest["verdict"] == "ok" and manifest["failures"] == []
    assert (manifest["model_uri"], manifest["rows"], manifest["unlabeled_rows"]) == ("models:/small-model/1", 275, 25)
    assert manifest["reasons"][0].startswith("ok: f1_macro") and "vs registered v1" in manifest["reasons"][0]
    assert any(reason.startswith("ok: slice colour red") for reason in manifest["reasons"])  # the version's slices
    report = json.loads((tmp_path / "out" / PERFORMANCE_FILE).read_text())
    assert {s["column"] for s in report["slices"]} == {"colour", "size"}
    assert "small-model v1 on 275 labeled rows: OK" in (tmp_path / "out" / "report.html").read_text()

    run = registered.get_run(manifest["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["keel.verdict"] == "ok"
    assert run.data.metrics["f1_macro"] == pytest.approx(manifest["metrics"]["f1_macro"])
    assert run.data.metrics["unlabeled_rows"] == 25 and run.data.metrics["degraded"] == 0
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["labeled.csv"]
    version = registered.get_model_version("small-model", "1")
    assert version.tags[PERFORMANCE_TAG].startswith("ok: f1_macro ") and "on 275 labeled rows of labeled.csv" in \
        version.tags[PERFORMANCE_TAG]
    logged = registered.get_logged_model(registered.get_run(version.run_id).outputs.model_outputs[0].model_id)
    on_labels = {m.key: m.value for m in logged.metrics if m.dataset_name == "labeled.csv"}
    assert on_labels["f1_macro"] == pytest.approx(manifest["metrics"]["f1_macro"])  # on the model's own page


def test_labels_the_model_now_gets_wrong_make_it_degraded(registered: MlflowClient, settings: KeelSettings,
                                                         tmp_path: Path) -> None:
    frame = small_frame(300, seed=4)
    flipped = frame.index % 2 == 0  # the world changed: half the outcomes went the other way
    frame.loc[flipped, "outcome"] = frame.loc[flipped, "outcome"].map({"yes": "no", "no": "yes"})
    manifest = check_performance("models:/small-model/1", labeled_table(tmp_path, frame), str(tmp_path / "out"),
                                 settings)
    assert manifest["verdict"] == "degraded"
    assert manifest["failures"][0].startswith("f1_macro ") and "vs registered v1" in manifest["failures"][0]
    assert manifest["metrics"]["f1_macro"] < manifest["registered"]["f1_macro"] - 0.05
    assert registered.get_model_version("small-model", "1").tags[PERFORMANCE_TAG].startswith("degraded: ")
    assert registered.get_run(manifest["mlflow_run_id"]).data.metrics["degraded"] == 1


def test_one_slice_gone_wrong_is_degraded_even_within_the_overall_tolerance(
        registered: MlflowClient, settings: KeelSettings, tmp_path: Path) -> None:
    frame = small_frame(300, seed=5)
    red = frame["colour"] == "red"
    frame.loc[red, "outcome"] = frame.loc[red, "outcome"].map({"yes": "no", "no": "yes"})
    manifest = check_performance(MODEL, labeled_table(tmp_path, frame), str(tmp_path / "out"), settings,
                                 PerformanceConfig(tolerance=0.9))
    assert manifest["verdict"] == "degraded"
    failed = [f.split(":")[0] for f in manifest["failures"]]
    assert "slice colour red" in failed and not {"f1_macro", "slice colour blue", "slice colour green"} & {
        f.split(" ")[0] if f.startswith("f1") else f for f in failed}  # the overall metric stays within 0.9


@pytest.mark.parametrize("change, message", [
    (lambda f: f.drop(columns=["outcome"]), "no label column 'outcome'"),
    (lambda f: f.assign(outcome=["maybe"] + list(f["outcome"][1:])), "column 'outcome': label(s) "
                                                                      "['maybe'] were not seen in training"),
    (lambda f: f.assign(size=["big"] + list(f["size"][1:])), "column 'size': 1 value(s) are not"),
    (lambda f: f.assign(outcome=list(f["outcome"][:40]) + [None] * (len(f) - 40)),
     "40 labeled row(s) (260 without a 'outcome'); a verdict needs at least 50"),
])
def test_a_table_it_cannot_judge_is_refused_by_name_and_leaves_no_trace(
        registered: MlflowClient, settings: KeelSettings, tmp_path: Path, change, message: str) -> None:
    source = labeled_table(tmp_path, change(small_frame(300, seed=6)))
    with pytest.raises(DataError, match=re.escape(f"{source}: {message}")):
        check_performance(MODEL, source, str(tmp_path / "out"), settings)
    assert not storage.exists(str(tmp_path / "out"), settings) and checks(registered) == []
    assert PERFORMANCE_TAG not in registered.get_model_version("small-model", "1").tags


def test_keel_evaluate_prints_the_verdict_and_can_fail_a_ci_job_on_it(registered: MlflowClient, tmp_path: Path) -> None:
    frame = small_frame(300, seed=4)
    frame["outcome"] = frame["outcome"].map({"yes": "no", "no": "yes"})
    source = labeled_table(tmp_path, frame)
    result = keel("evaluate", MODEL, source, str(tmp_path / "out"), "--fail-if-degraded", cwd=tmp_path)
    assert result.returncode == DEGRADED_EXIT_CODE, result.stderr[-2000:]
    assert "Downloading artifacts" not in result.stderr  # no MLflow progress bar between the lines
    lines = result.stdout.splitlines()
    assert lines[0] == f"models:/small-model/1 on 300 labeled rows of {source}"
    assert lines[1].split() == ["metric", "now", "registered", "change"]
    assert "Verdict: DEGRADED (promotion metric f1_macro)" in lines and "  f1_macro " in result.stdout
    again = keel("evaluate", MODEL, source, str(tmp_path / "out"), cwd=tmp_path)
    assert again.returncode == 1 and "holds an earlier output; pass --force" in again.stderr
    forced = keel("evaluate", MODEL, source, str(tmp_path / "out"), "--force", "-o", "json", cwd=tmp_path)
    assert forced.returncode == 0 and json.loads(forced.stdout)["verdict"] == "degraded"  # no flag: a report
    listed = keel("models", "list", cwd=tmp_path).stdout.splitlines()
    assert listed[0].split()[-2:] == ["on", "labels"] and listed[1].split()[-1] == "degraded"


def test_a_file_exported_under_its_own_names_is_read_with_label_column(registered: MlflowClient,
                                                                       settings: KeelSettings, tmp_path: Path) -> None:
    source = labeled_table(tmp_path, small_frame(300, seed=3).rename(columns={"outcome": "label"}))
    manifest = check_performance(MODEL, source, str(tmp_path / "out"), settings,
                                 PerformanceConfig(label_column="label"))
    assert manifest["verdict"] == "ok" and manifest["rows"] == 300
    both = labeled_table(tmp_path, small_frame(300, seed=3).assign(label="yes"), "both.csv")
    with pytest.raises(DataError, match="has both 'label' and 'outcome'; the model would read 'outcome'"):
        check_performance(MODEL, both, str(tmp_path / "both"), settings, PerformanceConfig(label_column="label"))
    with pytest.raises(ConfigError, match=r"input_column \(--input-column\) is for text classifiers"):
        check_performance(MODEL, source, str(tmp_path / "text"), settings, PerformanceConfig(input_column="label"))
    assert not (tmp_path / "both").exists() and not (tmp_path / "text").exists()


# ---- a text classifier ------------------------------------------------------------------------------------------

INTENTS = ["refund", "order_status", "cancel_order"]
UTTERANCES = {"refund": ["I want my money back", "refund please", "give me a refund for <ORDER_ID>"],
              "order_status": ["where is my parcel", "has my order shipped", "status of order <ORDER_ID>"],
              "cancel_order": ["cancel my order", "stop the order please", "I no longer want it, cancel"]}


def utterances(copies: int = 6) -> pd.DataFrame:
    rows = [{"text": text, "intent": intent} for _ in range(copies) for intent, texts in UTTERANCES.items()
            for text in texts]
    return pd.DataFrame(rows)


@pytest.fixture
def registered_intents(settings: KeelSettings, tmp_path: Path) -> float:
    """A one-layer MiniLM intent classifier (untrained head) registered through the intents register step, as
    if its test split had scored 0.1 of macro-F1 above what it scores on :func:`utterances`. Returns that score."""
    import torch
    from sklearn.metrics import f1_score

    from keel.intents.model import IntentModel, IntentSpec, load_tokenizer, pretrained_classifier, pretrained_dir
    from keel.intents.model import save_intent_model
    from keel.intents.registry import register_intents

    spec = IntentSpec(labels=INTENTS, layers=1, max_length=16, dropout=0.0)
    torch.manual_seed(0)
    evaluation = tmp_path / "evaluation"
    save_intent_model(pretrained_classifier(spec).eval(), spec, load_tokenizer(pretrained_dir()), evaluation / "model")
    table = utterances()
    predicted = [p["intent"] for p in IntentModel.load(evaluation / "model").classify(table["text"].tolist())]
    scored = float(f1_score(table["intent"], predicted, average="macro"))
    (evaluation / "model" / storage.MANIFEST).write_text(json.dumps({"stage": "evaluate"}))  # as evaluate publishes
    (evaluation / storage.MANIFEST).write_text(json.dumps({"stage": "evaluate"}))
    (evaluation / "evaluation.json").write_text(json.dumps({
        "f1_macro": scored + 0.1, "accuracy": 0.9, "fine_tuned": {"f1_macro": scored + 0.1},
        "baseline_bag_of_words": {"f1_macro": 0.5}, "chosen": "fine_tuned",
        "gate": {"passed": True, "champion_version": None, "reasons": ["no champion yet"], "failures": []}}))
    config = small_config(registry={"model_name": "intents-model"}).registry
    register_intents(str(evaluation), config, {"registry": config.model_dump(mode="json")}, "i1",
                     "customer_service_intents", storage.stage_uri(settings, "i1", "register"), settings)
    return scored


def test_a_text_classifier_is_judged_on_its_intents_and_its_report_holds_no_text(
        registered_intents: float, settings: KeelSettings, tmp_path: Path) -> None:
    source = labeled_table(tmp_path, utterances())
    degraded = check_performance("models:/intents-model@champion", source, str(tmp_path / "strict"), settings)
    assert degraded["verdict"] == "degraded" and degraded["metrics"]["f1_macro"] == pytest.approx(registered_intents)
    assert degraded["failures"] == [f"f1_macro {registered_intents:.4f} vs registered v1 "
                                    f"{registered_intents + 0.1:.4f} (worse by +0.1000, tolerance 0.05)"]
    lenient = check_performance("models:/intents-model/1", source, str(tmp_path / "lenient"), settings,
                                PerformanceConfig(tolerance=0.2))
    assert lenient["verdict"] == "ok" and lenient["rows"] == 54
    report = json.loads((tmp_path / "lenient" / PERFORMANCE_FILE).read_text())
    assert report["classes"] == INTENTS and sum(map(sum, report["confusion_matrix"])) == 54
    assert "intent" == report["label_column"] and "where is my parcel" not in json.dumps(report)
    exported = labeled_table(tmp_path, utterances().rename(columns={"text": "message", "intent": "category"}),
                             "export.csv")
    renamed = check_performance("models:/intents-model/1", exported, str(tmp_path / "export"), settings,
                                PerformanceConfig(tolerance=0.2, label_column="category", input_column="message"))
    assert renamed["metrics"] == lenient["metrics"]


@pytest.mark.parametrize("change, message", [
    (lambda f: f.rename(columns={"text": "message"}), "column 'text': a text classifier reads each row's text from "
                                                      "it; it is missing."),
    (lambda f: f.assign(intent=["complaint"] + list(f["intent"][1:])),
     "column 'intent': intent(s) ['complaint'] are not among the model's ['refund', 'order_status', 'cancel_order']."),
    (lambda f: f.rename(columns={"intent": "category"}).assign(category=["complaint"] + list(f["intent"][1:])),
     "column 'intent': intent(s) ['complaint'] are not among the model's ['refund', 'order_status', 'cancel_order']. "
     "(the file's 'category' read as 'intent')"),
])
def test_a_text_table_it_cannot_judge_is_refused_by_name(registered_intents: float, settings: KeelSettings,
                                                         tmp_path: Path, change, message: str) -> None:
    source = labeled_table(tmp_path, change(utterances()))
    with pytest.raises(DataError, match=re.escape(f"{source}: {message}")):
        check_performance("models:/intents-model@champion", source, str(tmp_path / "out"), settings,
                          PerformanceConfig(label_column="category" if "category" in message else None))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_uri, refused", [
    ("models:/small-model@champion", False), ("models:/small-model/3", False),
    ("models:/heart@champion", True),  # `--config` left out: a degraded heart would retrain small-model
    ("runs:/abc/model", False),  # not a registered model: nothing to hold it to
])
def test_a_retraining_refuses_to_check_one_model_and_retrain_another_before_reading_anything(
        model_uri: str, refused: bool, settings: KeelSettings, tmp_path: Path) -> None:
    from keel.config import load_pipeline_config
    from keel.monitor.performance import check_with_config
    from pipelines.model_performance import pipeline as model_performance

    check = load_pipeline_config(model_performance.CONFIG_FILE)
    training = small_config().to_json()
    missing = str(tmp_path / "not-there.csv")
    if refused:
        with pytest.raises(ConfigError, match=r"model_uri models:/heart@champion is model 'heart', but a degraded "
                                              r"verdict would train and register 'small-model' .* Pass the config "
                                              r"'heart' was trained with"):
            check_with_config(model_uri, missing, str(tmp_path / "out"), check, settings, training)
    else:  # held to the same name, it goes on to load the model (none is registered here)
        with pytest.raises(KeelError) as raised:
            check_with_config(model_uri, missing, str(tmp_path / "out"), check, settings, training)
        assert "degraded verdict" not in str(raised.value), raised.value
