"""Registration against a real MLflow (SQLite) with real stage outputs."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.types import Schema
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS
from typer.testing import CliRunner

from keel import storage, tracking
from keel.cli import app
from keel.config import PipelineConfig
from keel.evaluate import EVALUATION_FILE
from keel.data.ingest import DATA_FILE
from keel.errors import RegistryError, TrackingError
from keel.lineage import compare_versions, version_lineage
from keel.registry import (CHALLENGER, CHAMPION, SCHEMA_SAMPLE_ROWS, dataset_schema, flatten_params,
                           promote_by_hand, register)
from keel.runs import promotion_lines
from keel.settings import KeelSettings
from tests.foreign_load import model_requirements, score_without_keel
from tests.stages import run_stages, small_config, write_small_source

MODEL = "small-model"


@pytest.fixture
def staged_run(settings: KeelSettings, tmp_path: Path) -> dict[str, str]:
    return run_stages(settings, "run-a", write_small_source(tmp_path))


def _register(uris: dict[str, str], settings: KeelSettings, run_id: str = "run-a", approval: str = "gate",
              config: PipelineConfig | None = None) -> dict:
    config = config or small_config()
    registry = config.registry.model_copy(update={"approval": approval})
    return register(uris["train"], uris["evaluate"], uris["ingest"], uris["preprocess"], registry,
                    config.model_dump(mode="json", exclude={"contract"}), run_id, "small",
                    storage.stage_uri(settings, run_id, "register"), settings)


def _aliases(settings: KeelSettings) -> dict[str, str]:
    return {k: str(v) for k, v in tracking.mlflow_client(settings).get_registered_model(MODEL).aliases.items()}


def test_first_version_becomes_champion_with_lineage(staged_run: dict, settings: KeelSettings) -> None:
    registered = _register(staged_run, settings)
    assert registered["version"] == "1" and registered["promoted"]
    assert _aliases(settings) == {CHAMPION: "1", CHALLENGER: "1"}
    run = tracking.mlflow_client(settings).get_run(registered["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.PIPELINE_RUN_TAG] == "run-a"
    assert run.data.tags[tracking.GIT_COMMIT_TAG] == "test-commit"
    assert run.data.params["train.learning_rate"] == "0.001"
    assert "test_f1_macro" in run.data.metrics
    digest = storage.read_manifest(staged_run["ingest"], settings)["sha256"]
    dataset = run.inputs.dataset_inputs[0].dataset
    assert dataset.digest == digest[:16]
    ingested = storage.read_parquet(storage.join(staged_run["ingest"], DATA_FILE), settings)
    logged = Schema.from_json(json.dumps(json.loads(dataset.schema)["mlflow_colspec"]))
    assert logged == mlflow.models.infer_signature(ingested).inputs  # what MLflow infers row by row
    assert json.loads(dataset.profile) == {"num_rows": len(ingested), "num_elements": ingested.size}
    # The version is linked to the MLflow 3 logged model it was made from, as mlflow.register_model links it.
    version = tracking.mlflow_client(settings).get_model_version(MODEL, "1")
    logged = tracking.mlflow_client(settings).get_logged_model(tracking.logged_model_id(version.source))
    assert json.loads(logged.tags[MLFLOW_MODEL_VERSIONS]) == [{"name": MODEL, "version": "1"}]
    assert logged.source_run_id == registered["mlflow_run_id"]
    # `keel models show` links the run's page in the UI `mlflow ui` opens on this store
    page = f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    assert version_lineage(MODEL, "1", settings)["run_url"] == page
    shown = CliRunner().invoke(app, ["models", "show", registered["model_uri"]])  # as the run's summary prints it
    assert registered["model_uri"] == f"models:/{MODEL}/1" and shown.exit_code == 0, shown.output
    assert re.search(rf"MLflow run:\s+{re.escape(page)}\n", shown.stdout), shown.stdout


def test_the_dataset_schema_matches_mlflows_own_inference_past_its_sample() -> None:
    """Nulls and a column's first values beyond the sampled rows: types and ``required`` as MLflow infers
    them over every row."""
    rows = SCHEMA_SAMPLE_ROWS + 500
    late_null = [1.5] * (rows - 1) + [None]
    frame = pd.DataFrame({"whole": range(rows), "late_null": late_null, "text": ["a"] * rows,
                          "text_late_null": ["b"] * (rows - 1) + [None], "flag": [True, False] * (rows // 2),
                          "late_text": [None] * (SCHEMA_SAMPLE_ROWS + 1) + ["c"] * (rows - SCHEMA_SAMPLE_ROWS - 1),
                          "empty": [None] * rows, "stamp": pd.date_range("2024-01-01", periods=rows, freq="min")})
    assert dataset_schema(frame) == mlflow.models.infer_signature(frame).inputs
    assert [column.required for column in dataset_schema(frame).inputs] == [True, False, True, False, True,
                                                                           False, False, True]


def test_pyfunc_scores_raw_columns(staged_run: dict, settings: KeelSettings, tmp_path: Path) -> None:
    _register(staged_run, settings)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@{CHAMPION}")
    raw = pd.read_csv(tmp_path / "small.csv").drop(columns=["outcome"])
    predicted = model.predict(raw.head(20))
    assert set(predicted["prediction"]) <= {"yes", "no"}
    assert predicted[["probability_no", "probability_yes"]].sum(axis=1).round(5).eq(1).all()
    assert model.metadata.get_input_schema().input_names() == list(raw.columns)

    # packaged with it: the shares of each class it predicted on its test split, what serving's prediction
    # drift compares with
    predictor = model.unwrap_python_model().predictor
    raw_test = storage.read_parquet(storage.read_manifest(staged_run["preprocess"], settings)["raw_test"], settings)
    shares = predictor.predict(raw_test.drop(columns=["outcome"]))["prediction"].value_counts(normalize=True)
    reference = predictor.prediction_reference
    assert reference is not None and reference.categories == ["no", "yes"]
    assert reference.fractions == pytest.approx([shares.get("no", 0.0), shares.get("yes", 0.0), 0.0])


def test_a_registered_model_loads_and_scores_where_keel_is_not_installed(staged_run: dict, settings: KeelSettings,
                                                                        tmp_path: Path) -> None:
    """`mlflow models serve` and KServe install a model's requirements, which named `keel==0.1.0`: on PyPI that is
    somebody else's package (a process killer), and the model, whose loader imports Keel's code, still failed to
    load. Keel's code now travels in the model; its requirements are the loader's own, pinned."""
    _register(staged_run, settings)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1", dst_path=str(tmp_path / "model")))
    requirements = model_requirements(local / "requirements.txt")
    assert not [line for line in requirements if line.split("==")[0] == "keel"]
    assert "mlflow==" + mlflow.__version__ in requirements and all("==" in line for line in requirements)
    assert not [line for line in requirements if "+" in line]  # torch's +cpu is on no public index

    raw = pd.read_csv(tmp_path / "small.csv").drop(columns=["outcome"]).head(5)
    scored = score_without_keel(f"models:/{MODEL}/1", raw, settings.mlflow_tracking_uri, tmp_path / "foreign")
    in_keel = mlflow.pyfunc.load_model(f"models:/{MODEL}/1").predict(raw)
    pd.testing.assert_frame_equal(scored, in_keel, check_dtype=False, atol=1e-6)


def test_gate_failure_registers_a_challenger_and_leaves_the_champion(settings: KeelSettings,
                                                                     tmp_path: Path) -> None:
    _register(run_stages(settings, "run-a", write_small_source(tmp_path)), settings, "run-a")
    untrained = run_stages(settings, "run-b", tmp_path / "small.csv", epochs=0)  # scored against v1 here
    gate = json.loads((Path(untrained["evaluate"]) / EVALUATION_FILE).read_text())["gate"]
    assert not gate["passed"] and gate["champion_version"] == "1"
    registered = _register(untrained, settings, "run-b")
    assert not registered["promoted"] and registered["reason"].startswith("gate failed: f1_macro")
    assert _aliases(settings) == {CHAMPION: "1", CHALLENGER: "2"}
    run = tracking.mlflow_client(settings).get_run(registered["mlflow_run_id"])
    assert run.data.tags["keel.promoted"] == "false" and run.data.tags["keel.gate"] == "failed"
    # MLflow's registry page says why, a failed check a line, where its description was empty
    description = tracking.mlflow_client(settings).get_model_version(MODEL, "2").description
    assert description.splitlines() == ["Registered by Keel's `small` pipeline, run `run-b`.", "", "gate failed:",
                                        *(f"- {check}" for check in registered["checks"])]
    assert registered["checks"][0].startswith("f1_macro")


def test_versions_that_read_other_columns_say_so_where_a_person_compares_shows_and_promotes_them(
        settings: KeelSettings, tmp_path: Path) -> None:
    """v2 leaves `weight` out: served, it refuses the field v1 requires, so the gate held it back; the person
    deciding sees what changes for callers before and when promoting it."""
    from tests.conftest import SMALL_CONTRACT, small_frame

    _register(run_stages(settings, "run-a", write_small_source(tmp_path)), settings, "run-a")
    contract = {**SMALL_CONTRACT, "columns": {k: v for k, v in SMALL_CONTRACT["columns"].items() if k != "weight"}}
    narrower = small_config(contract=contract)
    held = _register(run_stages(settings, "run-b", tmp_path / "small.csv", config=narrower), settings, "run-b",
                     config=narrower)
    assert not held["promoted"] and "input columns differ from champion v1's (drops weight)" in held["reason"]
    assert version_lineage(MODEL, "2", settings)["inputs"] == ["size", "colour"]
    assert compare_versions(MODEL, CHAMPION, CHALLENGER, settings)["inputs_change"] == "drops weight"
    compared = CliRunner().invoke(app, ["models", "compare", MODEL])
    assert compared.exit_code == 0, compared.output
    assert "Input columns: v2 (challenger) drops weight against v1 (champion); callers" in compared.stdout
    shown = CliRunner().invoke(app, ["models", "show", MODEL, "1"])
    assert re.search(r"reads:\s+size, weight, colour\n", shown.stdout), shown.stdout
    promoted = CliRunner().invoke(app, ["models", "promote", MODEL, "2", "--reason", "callers updated", "--no-roll"])
    assert promoted.exit_code == 0, promoted.output
    assert "Input columns: v2 drops weight against v1; callers of the served model must send its fields." \
        in promoted.stdout and _aliases(settings)[CHAMPION] == "2" and "Classes:" not in promoted.stdout
    # labels renamed: callers reading `probability_yes` would find `probability_y`
    relabeled = small_config(contract={**contract, "columns": {**contract["columns"], "outcome": {
        "dtype": "category", "allowed": ["y", "n"]}}}, evaluate={"positive_class": "y"})
    small_frame(200).assign(outcome=lambda f: f["outcome"].str[0]).to_csv(tmp_path / "relabeled.csv", index=False)
    renamed = _register(run_stages(settings, "run-c", tmp_path / "relabeled.csv", config=relabeled), settings,
                        "run-c", config=relabeled)
    assert not renamed["promoted"]
    assert "classes differ from champion v2's (adds n, y; drops no, yes)" in renamed["reason"]
    assert version_lineage(MODEL, "3", settings)["classes"] == ["n", "y"]
    assert compare_versions(MODEL, "2", "3", settings)["classes_change"] == "adds n, y; drops no, yes"
    shown = CliRunner().invoke(app, ["models", "promote", MODEL, "3", "--reason", "labels renamed", "--no-roll"])
    assert "Classes: v3 adds n, y; drops no, yes against v2; callers" in shown.stdout, shown.output


def test_a_promotion_by_hand_moves_the_champion_and_records_who_and_why(settings: KeelSettings,
                                                                        tmp_path: Path) -> None:
    _register(run_stages(settings, "run-a", write_small_source(tmp_path)), settings, "run-a")
    _register(run_stages(settings, "run-b", tmp_path / "small.csv", epochs=0), settings, "run-b",  # gate failed
              config=small_config(train={"learning_rate": 0.01}))
    # Before deciding, a person compares the two: the metrics' changes and the one setting that differs.
    compared = compare_versions(MODEL, CHAMPION, CHALLENGER, settings)
    client = tracking.mlflow_client(settings)
    first, second = (client.get_run(compared[side]["run_id"]).data for side in ("first", "second"))
    assert (compared["first"]["version"], compared["second"]["version"]) == ("1", "2")
    f1 = next(row for row in compared["metrics"] if row["metric"] == "test_f1_macro")
    assert f1 == {"metric": "test_f1_macro", "first": first.metrics["test_f1_macro"],
                  "second": second.metrics["test_f1_macro"],
                  "change": pytest.approx(second.metrics["test_f1_macro"] - first.metrics["test_f1_macro"])}
    assert compared["params_differ"] == [{"param": "train.learning_rate", "first": "0.001", "second": "0.01"}]
    assert compared["params_same"] == len(first.params) - 1 and compared["second"]["gate"] == "failed"
    # run-b's compress stage (not run here) registered its int8 variant; run-a compressed nothing
    tracking.tag_compression_choice(client, compared["second"]["run_id"], "int8",
                                    "int8: fastest at batch 1 (0.010 ms p50); baseline: slower (0.020 ms)")
    shown = CliRunner().invoke(app, ["models", "compare", MODEL])
    assert shown.exit_code == 0, shown.output
    assert re.search(r"train\.learning_rate\s+0\.001\s+0\.01", shown.stdout)
    assert re.search(r"\nvariant\s+-\s+int8\s*\n", shown.stdout), shown.stdout
    assert re.search(rf"test_f1_macro\s+{first.metrics['test_f1_macro']:.4f}\s+{second.metrics['test_f1_macro']:.4f}"
                     rf"\s+{f1['change']:+.4f}", shown.stdout)
    assert f"1 config params differ, {len(first.params) - 1} are the same." in shown.stdout
    with pytest.raises(RegistryError, match="champion and 1 are both models:/small-model/1: nothing to compare"):
        compare_versions(MODEL, CHAMPION, "1", settings)
    with pytest.raises(RegistryError, match=r"models:/small-model/7: not in the registry .*versions: 1, 2"):
        promote_by_hand(MODEL, "7", "typo", settings)
    with pytest.raises(RegistryError, match="needs a reason"):
        promote_by_hand(MODEL, "2", "  ", settings)
    assert _aliases(settings) == {CHAMPION: "1", CHALLENGER: "2"}  # refused promotions change nothing

    moved = promote_by_hand(MODEL, "2", "overriding the gate for the demo", settings)
    assert moved == {"model_name": MODEL, "version": "2", "previous_champion": "1", "changed": True,
                     "reason": "overriding the gate for the demo", "inputs_change": "",
                     "classes_change": ""}
    assert _aliases(settings) == {CHAMPION: "2", CHALLENGER: "2"}
    tags = tracking.mlflow_client(settings).get_model_version(MODEL, "2").tags
    assert tags["keel.promoted_by_hand"] == "overriding the gate for the demo"
    assert tags["keel.previous_champion"] == "1" and tags["keel.promoted_by"] and tags["keel.promoted_at"]
    # The champion's lineage says where it came from and what was decided about it, by the gate and by hand.
    lineage = version_lineage(MODEL, CHAMPION, settings)
    assert (lineage["version"], lineage["aliases"], lineage["pipeline_run"]) == ("2", [CHALLENGER, CHAMPION], "run-b")
    assert lineage["git_commit"] == "test-commit" and lineage["promotion_checks"]
    assert lineage["promotion_reason"] == "gate failed: " + "; ".join(lineage["promotion_checks"])
    assert lineage["decisions"]["keel.promoted_by_hand"] == "overriding the gate for the demo"
    client = tracking.mlflow_client(settings)
    assert lineage["test_metrics"] == {k: v for k, v in client.get_run(lineage["run_id"]).data.metrics.items()
                                       if k.startswith("test_")} and "test_f1_macro" in lineage["test_metrics"]
    assert lineage["logged_model_id"] == client.get_model_version(MODEL, "2").source.removeprefix("models:/")
    # Both runs trained on the same bytes, which MLflow keeps as one dataset: each version names its own copy.
    first_run_data = version_lineage(MODEL, "1", settings)["datasets"]
    assert [d["digest"] for d in first_run_data] == [d["digest"] for d in lineage["datasets"]]
    assert [d["source"] for d in first_run_data] == [storage.join(storage.stage_uri(settings, "run-a", "ingest"),
                                                                  DATA_FILE)]
    assert [d["source"] for d in lineage["datasets"]] == [storage.join(storage.stage_uri(settings, "run-b", "ingest"),
                                                                       DATA_FILE)]
    assert lineage["params"]["registry.approval"] == "gate"
    with pytest.raises(RegistryError, match=r"models:/small-model@nope: not in the registry .*versions: 1, 2"):
        version_lineage(MODEL, "nope", settings)

    back = promote_by_hand(MODEL, "1", "rollback", settings)
    assert back["previous_champion"] == "2" and _aliases(settings)[CHAMPION] == "1"
    assert not promote_by_hand(MODEL, "1", "again", settings)["changed"]


def test_a_promotion_whose_server_cannot_be_reached_says_the_champion_moved_and_how_to_undo(
        settings: KeelSettings, tmp_path: Path) -> None:
    from tests.integration.conftest import free_port
    from tests.processes import keel

    _register(run_stages(settings, "run-a", write_small_source(tmp_path)), settings, "run-a")
    _register(run_stages(settings, "run-b", tmp_path / "small.csv", epochs=0), settings, "run-b")
    result = keel("models", "promote", MODEL, "2", "--reason", "try it", cwd=tmp_path,
                  env={"KEEL_RAY_DASHBOARD_URL": f"http://127.0.0.1:{free_port()}"})  # a head nobody runs
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "champion is now v2, but the served model was not rolled" in result.stderr
    assert f"keel models promote {MODEL} 1 --reason" in result.stderr
    assert _aliases(settings)[CHAMPION] == "2"
    # no head named and none started here: nothing to roll, and the output says what it did not do
    back = keel("models", "promote", MODEL, "1", "--reason", "back", cwd=tmp_path)
    assert back.returncode == 0, back.stderr[-2000:]
    assert "champion v2 -> v1 (back)" in back.stdout and "Serving unchanged (no RayService" in back.stdout
    shown = keel("models", "show", MODEL, cwd=tmp_path).stdout.splitlines()  # the champion, v1 again
    assert shown[0].startswith(f"models:/{MODEL}/1 (champion), READY, registered ")
    assert shown[1].split() == ["pipeline", "run:", "run-a", "(small)"] and "  promoted by hand:      back" in shown
    promotion = next(i for i, line in enumerate(shown) if line.startswith("  promotion:"))  # a check a line
    assert shown[promotion].split() == ["promotion:", "gate", "passed"]
    assert shown[promotion + 1].startswith(" " * 25 + "no champion yet: f1_macro ")  # under the reason


def test_gate_pass_promotes_an_equal_challenger(settings: KeelSettings, tmp_path: Path) -> None:
    _register(run_stages(settings, "run-a", write_small_source(tmp_path)), settings, "run-a")
    same = run_stages(settings, "run-b", tmp_path / "small.csv")  # same seed: same scores, tolerance 0
    registered = _register(same, settings, "run-b")
    assert registered["promoted"] and "vs champion v1" in registered["reason"]
    assert _aliases(settings) == {CHAMPION: "2", CHALLENGER: "2"}


def test_under_manual_approval_a_passing_version_waits_for_a_person(settings: KeelSettings, tmp_path: Path) -> None:
    from keel.cli.models import list_models

    _register(run_stages(settings, "run-a", write_small_source(tmp_path)), settings, "run-a")
    same = run_stages(settings, "run-b", tmp_path / "small.csv")  # passes the gate, as in the test above
    registered = _register(same, settings, "run-b", approval="manual")
    assert not registered["promoted"] and registered["awaiting_approval"]
    assert registered["reason"].startswith("awaiting approval (approval: manual): gate passed")
    assert f"keel models promote {MODEL} 2 --reason" in registered["reason"]
    assert registered["summary"] == "version 2, awaiting approval"
    # `keel run`'s summary: the verdict, each check the gate made on a line, then what a person does
    assert registered["checks"] and promotion_lines(registered["reason"], registered["checks"]) == [
        "awaiting approval (approval: manual): gate passed", *registered["checks"],
        f"`keel models promote {MODEL} 2 --reason ...` makes it champion"]
    # and so does the version's description, for the person who approves it from MLflow's registry page
    assert tracking.mlflow_client(settings).get_model_version(MODEL, "2").description.splitlines() == [
        "Registered by Keel's `small` pipeline, run `run-b`.", "", "awaiting approval (approval: manual): gate passed:",
        *(f"- {check}" for check in registered["checks"]), "", f"`keel models promote {MODEL} 2 --reason ...` makes it "
        "champion"]
    assert _aliases(settings) == {CHAMPION: "1", CHALLENGER: "2"}
    waiting = {row["version"]: row["awaiting_approval"] for row in list_models()}
    assert waiting == {1: False, 2: True}

    promote_by_hand(MODEL, "2", "approved after a week in shadow", settings)
    assert _aliases(settings)[CHAMPION] == "2"
    assert {row["version"]: row["awaiting_approval"] for row in list_models()} == {1: False, 2: False}


def test_a_person_rejects_a_version_awaiting_approval_with_a_reason_and_may_still_promote_it_later(
        settings: KeelSettings, tmp_path: Path) -> None:
    from keel.cli.models import list_models
    from keel.registry import reject_by_hand
    from tests.integration.conftest import free_port
    from tests.processes import keel

    _register(run_stages(settings, "run-a", write_small_source(tmp_path)), settings, "run-a")
    _register(run_stages(settings, "run-b", tmp_path / "small.csv"), settings, "run-b", approval="manual")
    with pytest.raises(RegistryError, match=r"models:/small-model/1 is the champion: to stop serving it, promote"):
        reject_by_hand(MODEL, "1", "no", settings)
    with pytest.raises(RegistryError, match="a rejection needs a reason"):
        reject_by_hand(MODEL, "2", "", settings)
    assert {row["version"]: row["awaiting_approval"] for row in list_models()} == {1: False, 2: True}

    rejected = reject_by_hand(MODEL, "2", "disagrees with v1 on 9% of live rows", settings)
    assert rejected == {"model_name": MODEL, "version": "2", "was_awaiting_approval": True,
                        "reason": "disagrees with v1 on 9% of live rows"}
    assert _aliases(settings) == {CHAMPION: "1", CHALLENGER: "2"}  # the champion is untouched
    rows = {row["version"]: row for row in list_models()}
    assert not rows[2]["awaiting_approval"] and rows[2]["rejected"] == "disagrees with v1 on 9% of live rows"
    tags = tracking.mlflow_client(settings).get_model_version(MODEL, "2").tags
    assert tags["keel.rejected_by"] and tags["keel.rejected_at"]
    # The CLI: nothing serves the model here, so nothing is withdrawn; a Ray head that does not answer is an
    # error that says the version is rejected all the same
    cli = keel("models", "reject", MODEL, "2", "--reason", "still no", cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert f"{MODEL}: v2 rejected (still no)\nNo shadow or canary served it." in cli.stdout
    unreachable = keel("models", "reject", MODEL, "2", "--reason", "still no", cwd=tmp_path,
                       env={"KEEL_RAY_DASHBOARD_URL": f"http://127.0.0.1:{free_port()}"})
    assert unreachable.returncode == 1 and "Traceback" not in unreachable.stderr
    assert "v2 is rejected, but where it serves as a shadow or canary it was not withdrawn" in unreachable.stderr

    promote_by_hand(MODEL, "2", "the disagreement was v1's mistake", settings)  # a person's later decision
    assert _aliases(settings)[CHAMPION] == "2" and list_models()[0]["rejected"] is None


def test_a_champion_promoted_after_evaluation_is_not_overwritten(settings: KeelSettings, tmp_path: Path) -> None:
    first = run_stages(settings, "run-a", write_small_source(tmp_path))  # evaluated: no champion yet
    second = run_stages(settings, "run-b", tmp_path / "small.csv")  # evaluated: no champion yet either
    _register(second, settings, "run-b")
    registered = _register(first, settings, "run-a")
    assert not registered["promoted"] and "champion changed to v1" in registered["reason"]
    assert _aliases(settings) == {CHAMPION: "1", CHALLENGER: "2"}


def test_failure_after_registration_withdraws_the_version(staged_run: dict, settings: KeelSettings,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _register(staged_run, settings)
    def broken_publish(*args: object) -> None:
        raise OSError("disk full")
    monkeypatch.setattr(storage, "publish_directory", broken_publish)
    with pytest.raises(OSError, match="disk full"):
        _register(staged_run, settings)
    client = tracking.mlflow_client(settings)
    assert [str(v.version) for v in client.search_model_versions(f"name='{MODEL}'")] == ["1"]
    assert _aliases(settings) == {CHAMPION: "1", CHALLENGER: "1"}
    experiment = client.get_run(client.get_model_version(MODEL, "1").run_id).info.experiment_id
    links = [json.loads(model.tags[MLFLOW_MODEL_VERSIONS]) for model in client.search_logged_models([experiment])]
    assert sorted(links, key=len) == [[], [{"name": MODEL, "version": "1"}]]  # none to the deleted version


def test_runs_started_outside_a_repository_are_tagged_with_the_commit_of_keels_own_checkout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`keel run` from a directory that is no repository tagged 'unknown', though the pipeline code it ran
    comes from a checkout; the working directory's repository still comes first, KEEL_GIT_COMMIT before both."""
    def head(directory: Path) -> str:
        return subprocess.run(["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()

    checkout = head(Path(tracking.__file__).parent)
    monkeypatch.chdir(tmp_path)
    assert tracking.git_commit(KeelSettings(home=tmp_path)) == checkout
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false",
                    "commit", "-q", "--allow-empty", "-m", "user's project"], cwd=tmp_path, check=True)
    assert tracking.git_commit(KeelSettings(home=tmp_path)) == head(tmp_path) != checkout
    assert tracking.git_commit(KeelSettings(home=tmp_path, git_commit="abc123")) == "abc123"


def test_each_pipeline_logs_to_its_own_experiment_unless_one_is_named(settings: KeelSettings) -> None:
    """Every pipeline's runs went to one experiment, `keel`, where MLflow's run table and charts mixed a
    classifier's metrics with a recommender's."""
    client = tracking.mlflow_client(settings)
    classifier = client.get_run(tracking.pipeline_run(settings, "medical-diagnosis-1", "medical_diagnosis"))
    recommender = client.get_run(tracking.pipeline_run(settings, "ecommerce-recommendations-1",
                                                       "ecommerce_recommendations"))
    assert [client.get_experiment(run.info.experiment_id).name for run in (classifier, recommender)] == [
        "medical_diagnosis", "ecommerce_recommendations"]
    assert classifier.info.run_name == "medical-diagnosis-1"  # not the pipeline's name twice over
    assert tracking.pipeline_run(settings, "medical-diagnosis-1", "medical_diagnosis") == classifier.info.run_id

    shared = settings.model_copy(update={"experiment_name": "team-a"})
    joined = client.get_run(tracking.pipeline_run(shared, "medical-diagnosis-2", "medical_diagnosis"))
    assert client.get_experiment(joined.info.experiment_id).name == "team-a"
    assert [run.info.run_id for run in tracking.runs_of_pipeline_run(client, "medical-diagnosis-2")] == [
        joined.info.run_id]


def test_a_deleted_experiment_is_named_with_how_to_restore_it(settings: KeelSettings) -> None:
    """MLflow keeps a deleted experiment's name, so every step failed with 'The experiment 1 must be in the
    active state', naming neither the experiment nor a way out."""
    client = tracking.mlflow_client(settings)
    client.delete_experiment(tracking.experiment_id(client, settings, "medical_diagnosis"))
    with pytest.raises(TrackingError, match=r"experiment medical_diagnosis \(id 1\) .* is deleted: restore it "
                                            r"\(`MLFLOW_TRACKING_URI=sqlite:.* mlflow experiments restore "
                                            r"--experiment-id 1`\), or set KEEL_EXPERIMENT_NAME"):
        tracking.pipeline_run(settings, "medical-diagnosis-3", "medical_diagnosis")


def test_flatten_params() -> None:
    assert flatten_params({"train": {"lr": 0.1, "sizes": [1, 2], "scaling": {"gpu": "auto"}}}) == {
        "train.lr": "0.1", "train.sizes": "[1, 2]", "train.scaling.gpu": "auto"}


def test_models_list_shows_every_version_of_every_model_past_the_registrys_first_page(
        settings: KeelSettings) -> None:
    """The registry answers a page at a time (100 models by default): a list that read only the first page
    would silently leave models out once a team has more."""
    from keel.cli.models import list_models

    client = tracking.mlflow_client(settings)
    accuracy = {}
    for name, versions in (("model-a", 3), ("model-b", 1), ("model-c", 2)):
        client.create_registered_model(name)
        experiment = client.create_experiment(f"trained-{name}")  # runs in three experiments
        for number in range(1, versions + 1):
            run = client.create_run(experiment).info.run_id
            accuracy[(name, number)] = 0.5 + number / 10 + len(name) / 100
            client.log_metric(run, "test_accuracy", accuracy[(name, number)])
            client.log_metric(run, "train_loss", 0.1)  # not a key metric: left out
            client.create_model_version(name, source=f"{settings.artifact_root}/{name}", run_id=run)
    with pytest.MonkeyPatch.context() as patch:  # a page of runs a query, not a round trip for each version
        patch.setattr(type(client), "get_run", lambda *_: pytest.fail("get_run per version"))
        rows = list_models(page_size=2)
    assert [(row["name"], row["version"]) for row in rows] == [
        ("model-a", 3), ("model-a", 2), ("model-a", 1), ("model-b", 1), ("model-c", 2), ("model-c", 1)]
    assert {(row["name"], row["version"]): row["metrics"] for row in rows} == {
        key: {"test_accuracy": value} for key, value in accuracy.items()}


def test_the_registered_model_scores_tables_as_pandas_reads_them_parquet_dtypes_and_gaps_alike(
        settings: KeelSettings, tmp_path: Path) -> None:
    """Parquet written from pandas keeps nullable Int64, boolean and category dtypes. Ingest reads them as a CSV
    would (a nullable boolean failed the register step), and the pyfunc, as its run summary says to load it,
    scores the table whether an integer column has a gap (float64) or not (int64)."""
    from tests.conftest import SMALL_CONTRACT, small_frame

    frame = small_frame(200).assign(visits=lambda f: pd.array([i % 4 if i % 9 else None for i in range(len(f))],
                                                              dtype="Int64"),
                                    vip=lambda f: pd.array([i % 3 == 0 if i % 7 else None for i in range(len(f))],
                                                           dtype="boolean"),
                                    colour=lambda f: f["colour"].astype("category"),
                                    outcome=lambda f: f["outcome"].astype("category"))
    frame.to_parquet(tmp_path / "typed.parquet")
    contract = {**SMALL_CONTRACT, "columns": {**SMALL_CONTRACT["columns"],
                                              "visits": {"dtype": "int", "nullable": True, "min": 0, "max": 5},
                                              "vip": {"dtype": "bool", "nullable": True}},
                "thresholds": {"min_rows": 10, "max_missing_fraction": 0.2}}
    config = small_config(contract=contract)
    registered = _register(run_stages(settings, "typed", tmp_path / "typed.parquet", config=config), settings,
                           "typed", config=config)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}/{registered['version']}")
    features = model.metadata.get_input_schema().input_names()
    assert sorted(features) == ["colour", "size", "vip", "visits", "weight"]
    as_saved = pd.read_parquet(tmp_path / "typed.parquet")[features]
    no_gaps = as_saved.dropna().astype({"visits": "int64", "vip": "bool", "colour": "str"})
    for table in (as_saved, no_gaps, as_saved.astype({"visits": "float64"})):
        predicted = model.predict(table)
        assert len(predicted) == len(table) and set(predicted["prediction"]) <= {"no", "yes"}
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"missing inputs \['vip'\]"):
        model.predict(as_saved.drop(columns=["vip"]))
