import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from keel import __version__
from keel.cli import app
from keel.cli.models import model_and_version
from keel.cli.run import parse_params, print_summary, stage_rows
from keel.errors import ConfigError
from keel.tracking import mlflow_run_url
from tests.processes import keel, modules_loaded_by


def test_params_are_typed_name_value_pairs() -> None:
    accepted = {"source": "String", "serve": "Boolean", "serve_port": "Integer"}
    assert parse_params(["source=s3://b/x.csv", "serve=true", "serve_port=8080"], accepted) == {
        "source": "s3://b/x.csv", "serve": True, "serve_port": 8080}
    with pytest.raises(ConfigError, match="expected NAME=VALUE"):
        parse_params(["source"], accepted)
    with pytest.raises(ConfigError, match=r"has no such parameter; it takes \['serve', 'serve_port', 'source'\]"):
        parse_params(["lr=1"], accepted)
    with pytest.raises(ConfigError, match="serve_port=eighty: expected an integer"):
        parse_params(["serve_port=eighty"], accepted)


@pytest.mark.parametrize("pair, message", [("serve_port=99999", "expected 1 to 65535"),
                                           ("serve_port=0", "expected 1 to 65535"), ("gpus=-1", "expected 0 or more")])
def test_parameters_out_of_their_range_are_refused_before_anything_runs(pair: str, message: str) -> None:
    """A serve_port of 99999 trained, registered, and failed the deploy step with a pydantic traceback."""
    with pytest.raises(ConfigError, match=f"^--param {pair}: {message}.$"):
        parse_params([pair], {"serve_port": "Integer", "gpus": "Integer"})


def test_a_step_that_crashes_is_named_with_its_exception_and_where_the_traceback_is(tmp_path: Path) -> None:
    """Without a Keel error in the log the summary said "? failed: Pipeline ... finished with status FAILURE"."""
    from keel.local import crash_report

    log = "    Traceback (most recent call last):\n      ...\n    ZeroDivisionError: division by zero\n"
    failure = ("Pipeline 'medical-diagnosis' finished with status FAILURE. Inner task failed: 'deploy' inside "
               "'condition-2' inside 'condition-1'.")
    assert crash_report(failure, log, tmp_path / "run.log") == {
        "stage": "deploy", "error": f"it raised ZeroDivisionError: division by zero; the traceback is in "
                                    f"{tmp_path / 'run.log'}"}
    assert crash_report("out of memory", "", tmp_path / "run.log")["stage"] == "?"
    # a step outside any condition: kfp.local's failure names only the pipeline, its log the task, coloured
    log = ("09:18:43.479 - ERROR - Task \x1b[96m'register'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m\n"
           "    mlflow.exceptions.MlflowException: Input example does not match the model signature.\n")
    assert crash_report("Pipeline 'medical-diagnosis' finished with status FAILURE.", log, tmp_path / "run.log") == {
        "stage": "register", "error": "it raised mlflow.exceptions.MlflowException: Input example does not match "
                                      f"the model signature.; the traceback is in {tmp_path / 'run.log'}"}


@pytest.mark.parametrize("args, message", [
    (["run", "nope"], "unknown pipeline 'nope'"),
    (["run", "medical_diagnosis", "--param", "learning_rate=1"], "--param learning_rate"),
    (["run", "medical_diagnosis", "--config", "missing.yaml"], "missing.yaml: config file not found"),
    (["run", "medical_diagnosis", "--param", "gpus=999"], "asks for 999 GPU worker(s) but this machine"),
    (["run", "retrain_when_degraded"], "retrain_when_degraded needs --param labels_source=... (it has no default)"),
    (["schedule", "retrain_when_degraded", "--cron", "0 6 * * 1", "--host", "http://127.0.0.1:9"],
     "retrain_when_degraded needs --param labels_source=..."),
    (["models", "show", "models:/medical-diagnosis/1", "2"], "names version '1' already, and the version argument '2'"),
    (["models", "promote", "medical-diagnosis", "--reason", "r"], "medical-diagnosis: which version?"),
    (["models", "compare", "medical-diagnosis@champion"], "compare takes the model's name, then its two versions"),
    # run in another directory than `keel run` was, the usual cause of an empty local registry
    (["models", "show", "medical-diagnosis"], "(no such model). No model is registered in "),
    (["serve", "models:/medical-diagnosis@champion"], "at all. Keel keeps its local runs and registry in KEEL_HOME"),
])
def test_user_errors_print_one_line_and_exit_1(args: list[str], message: str, keel_home: Path,
                                               tmp_path: Path) -> None:
    result = keel(*args, cwd=tmp_path)
    assert result.returncode == 1
    assert message in result.stderr and result.stderr.startswith("keel: error:")
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("model, version, expected", [
    ("medical-diagnosis", None, ("medical-diagnosis", "champion")),
    ("medical-diagnosis", "3", ("medical-diagnosis", "3")),
    ("models:/medical-diagnosis/3", None, ("medical-diagnosis", "3")),  # as `keel run` prints a new version
    ("medical-diagnosis@challenger", None, ("medical-diagnosis", "challenger")),
    ("models:/medical-diagnosis@champion", "champion", ("medical-diagnosis", "champion")),  # said twice, the same
])
def test_keel_models_takes_a_version_apart_from_the_name_or_in_a_reference(model: str, version: str | None,
                                                                           expected: tuple[str, str]) -> None:
    assert model_and_version(model, version, default="champion") == expected


@pytest.mark.parametrize("model", ["medical-diagnosis/", "models:/", "@champion"])
def test_a_reference_without_its_name_or_version_is_refused_with_the_forms_that_work(model: str) -> None:
    with pytest.raises(ConfigError, match="expected a model name .* or a reference to one version"):
        model_and_version(model, None, default="champion")


def test_a_run_name_an_earlier_run_has_is_refused(keel_home: Path, tmp_path: Path) -> None:
    """The second run would have logged into the first one's MLflow run and replaced the outputs its version's
    lineage points at."""
    (keel_home / "artifacts" / "runs" / "nightly" / "ingest").mkdir(parents=True)
    (keel_home / "artifacts" / "runs" / "nightly" / "ingest" / "manifest.json").write_text("{}")
    result = CliRunner().invoke(app, ["run", "medical_diagnosis", "--run-name", "nightly"])
    assert result.exit_code == 1 and isinstance(result.exception, ConfigError)
    assert str(result.exception) == (f"--run-name nightly: an earlier run has that name (its outputs are at "
                                     f"{keel_home / 'artifacts' / 'runs' / 'nightly'}); choose another, or leave "
                                     "--run-name out for a fresh one.")


def test_bad_config_file_names_the_field(keel_home: Path, tmp_path: Path) -> None:
    (tmp_path / "override.yaml").write_text("train:\n  learning_rat: 0.1\n")
    result = keel("run", "medical_diagnosis", "--config", "override.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert "train.learning_rat: Extra inputs are not permitted (did you mean 'learning_rate'?)" in result.stderr


def test_models_list_is_empty_json_before_any_run(keel_home: Path, tmp_path: Path) -> None:
    result = keel("models", "list", "--output", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
    shown = keel("models", "list", cwd=tmp_path)
    assert shown.stdout.startswith(f"No registered models yet at sqlite:///{keel_home / 'mlflow.db'}: run `keel run")
    assert "set KEEL_HOME to that directory's .keel" in shown.stdout and not shown.stderr  # nor MLflow's set-up lines


def test_compile_writes_yaml(tmp_path: Path, keel_home: Path) -> None:
    result = keel("pipelines", "compile", "--output-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "medical_diagnosis.yaml").read_text().startswith("# PIPELINE DEFINITION")


@pytest.mark.parametrize("promoted, previous, loadable, alias", [
    (True, "3", "models:/recs@champion", "champion"), (False, "3", "models:/recs/4", "challenger; the champion stays"),
    (False, None, "models:/recs/4", "challenger; no champion yet")])
def test_the_summary_says_how_to_load_the_version_this_run_registered(promoted: bool, previous: str | None,
                                                                      loadable: str, alias: str,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """A challenger is loaded by its version: the champion alias names another model, or none at all."""
    print_summary({"run_id": "r", "succeeded": True, "wall_s": 1.0, "_rows": [], "test_metrics": {},
                   "model_uri": "models:/recs/4", "champion": promoted, "model_name": "recs",
                   "previous_champion": previous, "promotion": "gate failed", "tracking_uri": "sqlite:///x.db",
                   "artifacts": "a", "log": "l"})
    shown = capsys.readouterr().out
    assert f'Load it: mlflow.pyfunc.load_model("{loadable}")' in shown
    assert f"Registered model: models:/recs/4 ({alias})\n" in shown
    assert "seconds" not in shown  # no stage finished: no empty table


@pytest.mark.parametrize("tracking_uri, browse, run_page", [
    ("sqlite:////home/me/my keel/mlflow.db", "ui --backend-store-uri 'sqlite:////home/me/my keel/mlflow.db'",
     "http://127.0.0.1:5000/#/experiments/3/runs/abc"),
    ("http://mlflow.keel:5000/", None, "http://mlflow.keel:5000/#/experiments/3/runs/abc")])
def test_the_summary_says_how_to_browse_a_local_store_in_mlflows_ui(tracking_uri: str, browse: str | None,
                                                                     run_page: str,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """A tracking server has its own UI; a local SQLite store is seen through `mlflow ui` on it. Either way the
    summary links the run's page, which took finding the experiment and then the run among the others."""
    print_summary({"run_id": "r", "succeeded": True, "wall_s": 1.0, "_rows": [], "test_metrics": {},
                   "model_uri": "models:/m/1", "champion": True, "model_name": "m", "promotion": "gate passed",
                   "tracking_uri": tracking_uri, "artifacts": "a", "log": "l",
                   "mlflow_run_url": mlflow_run_url(tracking_uri, "3", "abc")})
    lines = capsys.readouterr().out.splitlines()
    shown = [line for line in lines if line.startswith("Browse it: ")]
    if browse is None:
        assert shown == []
    else:
        assert len(shown) == 1 and f"/mlflow {browse}  (then http://127.0.0.1:5000)" in shown[0]
    assert f"MLflow run: {run_page}" in lines
    assert mlflow_run_url(tracking_uri, None, "abc") is None  # a run that registered nothing links none


def test_the_summary_gives_the_gate_verdict_in_the_table_and_its_checks_a_line_each_below(
        capsys: pytest.CaptureFixture) -> None:
    """A gate's reasons ran to 600 characters, in the evaluate row and again after Promotion:."""
    checks = ["f1_macro 0.9100 vs champion v1 0.9713 (worse by +0.0613, tolerance 0.01)",
              "slice mean_radius [15, 100): f1_macro 0.8000 vs champion v1 0.9201 (worse by +0.1201, slice tolerance 0.05)"]
    evaluation = {"duration_s": 5.0, "accuracy": 0.9, "rows": 114, "gate": "gate failed: " + "; ".join(checks),
                  "gate_passed": False}
    rows = stage_rows({"evaluate": evaluation})
    print_summary({"run_id": "r", "succeeded": True, "wall_s": 1.0, "_rows": rows, "test_metrics": {},
                   "model_uri": "models:/m/2", "champion": False, "model_name": "m",
                   "promotion": "gate failed: " + "; ".join(checks), "promotion_checks": checks,
                   "tracking_uri": "sqlite:///x.db", "artifacts": "a", "log": "l"})
    out = capsys.readouterr().out
    assert rows == [["evaluate", "5.00", "accuracy 0.9000 on 114 test rows; gate failed"]]
    assert f"Promotion: gate failed\n  {checks[0]}\n  {checks[1]}\nMLflow tracking URI" in out


def test_version_names_keel_python_and_each_package_of_the_stack_as_installed() -> None:
    from importlib import metadata
    from platform import python_version

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[:2] == [f"keel {__version__}", f"Python {python_version()}"]
    assert f"ray {metadata.version('ray')}" in lines and f"mlflow {metadata.version('mlflow')}" in lines
    assert len(lines) == 9  # kfp, ray, mlflow, torch, minio, prometheus-client, kubernetes


def test_the_command_line_itself_starts_without_pandas_or_the_evaluation_code() -> None:
    """Every `keel` command pays for what keel.cli imports: keel.evaluate (pandas, scikit-learn) was 0.35 s
    of each, and is only needed to summarize a finished run."""
    assert modules_loaded_by("import keel.cli", ("pandas", "sklearn", "keel.evaluate")) == []


def test_commands_that_train_or_load_no_model_start_without_torch() -> None:
    """torch is 1.2-1.5 s of every process that imports it: `keel serve status` (and stop, promote's roll),
    `keel run` up to its first step and its summary, and a skipped search load none of it."""
    assert modules_loaded_by("import keel.cli, keel.cli.run, keel.serve.control, keel.train.scaling, keel.tune, "
                             "keel.runs", ("torch", "keel.registry", "keel.predictor")) == []


def test_serve_status_and_stop_start_without_ray_serve_or_the_replicas_code() -> None:
    """`keel serve status|stop` (and the roll after `keel models promote`) only read and write the Serve config
    over REST: Ray Serve, FastAPI and pandas, which a replica needs, made each such command 1.9 s instead of
    0.3 s."""
    assert modules_loaded_by("import keel.cli.serve, keel.serve.control", (
        "ray", "fastapi", "pandas", "prometheus_client", "keel.serve.deployment", "keel.serve.canary",
        "keel.serve.shadow")) == []


def test_serve_status_counts_a_deployments_replicas_by_state_as_serves_rest_api_lists_them() -> None:
    """Serve's REST status lists replicas one by one (the Python API's replica_states is not in it): the text
    status printed `{}` for every deployment."""
    from keel.cli.serve import replicas_line

    rolling = {"status": "UPDATING", "target_num_replicas": 2, "recent_dead_replicas": [{"replica_id": "a"}],
               "replicas": [{"replica_id": "b", "state": "RUNNING"}, {"replica_id": "c", "state": "STARTING"}]}
    assert replicas_line(rolling) == ("replicas: 1 RUNNING, 1 STARTING (target 2); 1 stopped recently (a roll, a "
                                      "scale-down or a crash; Ray's dashboard has their logs)")
    assert replicas_line({"target_num_replicas": 1, "replicas": []}) == "replicas: none yet (target 1)"


def test_the_served_models_sample_request_is_a_row_the_api_accepts_with_values_a_real_row_has() -> None:
    """`keel serve`'s "Try it" line: an integer column sends a whole median (a class of 2, not a mean of 2.06),
    a bool column true or false, and the row passes the served request schema."""
    from keel.cli.serve import typical_row
    from keel.data.draft import draft_contract
    from keel.data.transform import FeatureTransform
    from keel.serve.schema import record_model
    from tests.conftest import heart_table

    table = heart_table().assign(pclass=[1] * 40 + [2] * 50 + [3] * 30)  # mean 1.92
    transform = FeatureTransform.fit(table, draft_contract(table, "target", "heart", "heart.csv").contract)
    row = typical_row(transform)
    assert row["pclass"] == 2 and isinstance(row["pclass"], int) and row["age"] == table["age"].median()
    assert row["smoker"] is bool(table["smoker"].median() >= 0.5)
    assert row["chol"] == round(float(table["chol"].median()), 4) and row["sex"] == table["sex"].mode()[0]
    assert record_model(transform).model_validate(row).model_dump() == row


def test_the_printed_request_survives_the_shell_whatever_the_column_names(capsys: pytest.CaptureFixture) -> None:
    """A column named `patient's age` closed the single quotes around the body; `Fare £` was escaped as \\u00a3."""
    import shlex

    from keel.cli.output import OutputFormat
    from keel.cli.serve import _announce

    body = json.dumps({"records": [{"patient's age": 41, "Fare £": 7.25}]}, ensure_ascii=False)
    _announce("http://127.0.0.1:8000", "models:/m@champion", OutputFormat.table, None, None,
              lambda: ("/v1/models/m:predict", body))
    curl = shlex.split(capsys.readouterr().out.split("Try it:\n", 1)[1])
    assert curl[7] == "-d" and json.loads(curl[8]) == json.loads(body) and "Fare £" in curl[8]


def test_ctrl_c_ends_the_run_naming_the_step_it_stopped_marks_its_mlflow_run_killed_and_exits_130(
        keel_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kfp.local raises KeyboardInterrupt out of the step's wait (the step, in the same process group, got the
    SIGINT too). Before, `keel run` exited 130 without a word and left its MLflow run RUNNING."""
    import mlflow

    from keel import local, tracking
    from keel.settings import load_settings

    settings = load_settings()

    def interrupted_pipeline(**arguments):
        tracking.pipeline_run(settings, arguments["run_name"], "medical_diagnosis")  # as the tune step opens it
        print("10:08:41 - INFO - Executing task \x1b[96m'train'\x1b[0m", flush=True)
        raise KeyboardInterrupt

    run = local.run_local(interrupted_pipeline, {}, "ctrl-c", settings)
    assert run.interrupted and not run.succeeded and run.error == {"stage": "train", "error": "interrupted (Ctrl-C)"}

    monkeypatch.setattr(local, "run_local", lambda *arguments, **options: run)
    result = CliRunner().invoke(app, ["run", "medical_diagnosis", "--run-name", "ctrl-c-cli"])
    assert result.exit_code == 130, result.output
    assert "Run ctrl-c INTERRUPTED in" in result.stdout
    assert "keel: interrupted during train after" in result.stderr
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    (killed,) = client.search_runs([client.get_experiment_by_name("medical_diagnosis").experiment_id])
    assert killed.info.status == "KILLED"


def test_sigterm_to_keel_run_alone_stops_its_running_step_too(keel_home: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`kill PID` reaches `keel run` alone, not the step it runs in a subprocess: the step ran on as an orphan.
    Now the step is sent SIGINT, as Ctrl-C would, and the run ends interrupted with 143."""
    import os
    import shlex
    import signal
    import subprocess
    import sys
    import time

    from keel import local
    from keel.settings import load_settings

    settings, ended = load_settings(), tmp_path / "step-ended"
    step_code = (f"import pathlib, time\ntry:\n    time.sleep(120)\n"
                 f"except KeyboardInterrupt:\n    pathlib.Path({str(ended)!r}).write_text('SIGINT')\n")
    before = signal.getsignal(signal.SIGTERM)

    def pipeline_whose_step_is_running(**arguments):
        print("10:08:41 - INFO - Executing task \x1b[96m'tune'\x1b[0m", flush=True)
        script = tmp_path / "step.py"
        script.write_text(step_code)
        with subprocess.Popen(["sh", "-c", f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}; true"]) as step:
            time.sleep(1)  # the step is in its sleep
            os.kill(os.getpid(), signal.SIGTERM)
            step.wait(timeout=60)

    run = local.run_local(pipeline_whose_step_is_running, {}, "sigterm", settings)
    assert run.interrupted and run.error == {"stage": "tune", "error": "terminated (SIGTERM)"}
    assert run.exit_code == 143
    deadline = time.monotonic() + 30
    while not ended.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ended.read_text() == "SIGINT"  # the step was told to stop, and stopped as on Ctrl-C
    assert signal.getsignal(signal.SIGTERM) == before

    monkeypatch.setattr(local, "run_local", lambda *arguments, **options: run)
    result = CliRunner().invoke(app, ["run", "medical_diagnosis", "--run-name", "sigterm-cli"])
    assert result.exit_code == 143, result.output
    assert "keel: terminated during tune after" in result.stderr


def test_a_step_that_runs_on_after_it_was_told_to_stop_is_ended(tmp_path: Path) -> None:
    """Ray Train's driver answers SIGINT by asking its controller to abort; the train step trained on to its last
    epoch and published, long after `keel run` had said it was interrupted."""
    import os
    import shlex
    import signal
    import subprocess
    import sys
    import time

    from keel import local

    ended = tmp_path / "step-ended"
    step_code = ("import pathlib, signal, sys, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                 f"signal.signal(signal.SIGTERM, lambda *_: (pathlib.Path({str(ended)!r}).write_text('SIGTERM'), "
                 "sys.exit(0)))\nprint('ready', flush=True)\ntime.sleep(120)\n")
    script = tmp_path / "step.py"
    script.write_text(step_code)
    with local.StepStopper(grace_s=1) as stopper:  # kfp.local runs a step's Python under `sh -c`
        step = subprocess.Popen(["sh", "-c", f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}; true"],
                                stdout=subprocess.PIPE, text=True)
        assert step.stdout is not None and step.stdout.readline() == "ready\n"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(30)
        stopper.end_steps()
        assert not stopper.steps()
    assert stopper.signal_number == signal.SIGHUP
    assert ended.read_text() == "SIGTERM"


def test_a_draft_named_as_a_model_of_another_table_says_so_and_takes_a_name_of_its_own(settings,
                                                                                      tmp_path: Path) -> None:
    """The model name defaults to the file's: another table under a registered model's name trained versions the
    gate then held back as changes to the served API, with nothing said at the draft."""
    import numpy as np

    from tests.conftest import small_frame
    from tests.stages import register_small_model

    register_small_model(settings, "run-a")  # small-model v1: reads size, weight, colour; predicts no, yes
    same, other = tmp_path / "same" / "small-model.csv", tmp_path / "other" / "small-model.csv"
    for path in (same, other):
        path.parent.mkdir()
    small_frame(80).to_csv(same, index=False)
    small_frame(80).drop(columns=["colour"]).assign(height=np.linspace(1.5, 2.0, 80)).to_csv(other, index=False)

    def draft(source: Path, *options: str) -> str:
        result = CliRunner().invoke(app, ["contract", "draft", str(source), "--target", "outcome", "--output",
                                          str(source.with_suffix(".yaml")), "--force", *options])
        assert result.exit_code == 0, result.output
        return result.stdout

    assert "note:" not in draft(same) and "model_name: small-model" in draft(same)
    drafted = draft(other)
    assert ("  note: models:/small-model is registered already; against its champion v1, a model of this table\n"
            "    columns: adds height; drops colour\n"
            "  the gate would hold such a version back as a change to the served API: pass --model-name to train a "
            "model of its own.\n") in drafted
    renamed = draft(other, "--model-name", "heights")
    assert "note:" not in renamed and "model_name: heights" in renamed
    refused = CliRunner().invoke(app, ["contract", "draft", str(other), "--target", "outcome", "--model-name", "-x"])
    assert isinstance(refused.exception, ConfigError)
    assert "--model-name '-x': expected letters" in str(refused.exception)


def test_on_a_cluster_serve_status_asks_the_rayservice_and_serving_by_hand_is_refused(
        keel_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the chart's config, KEEL_RAY_ADDRESS is the training cluster's head: `keel serve status` reported it
    serving nothing, and `keel serve MODEL` put a model on the training cluster, where no client reaches it."""
    from keel.serve import control

    for name, value in {"KEEL_RAY_ADDRESS": "http://keel-train-head-svc:8265", "KEEL_RAY_SERVICE": "keel-serve",
                        "KEEL_KUBE_NAMESPACE": "keel"}.items():
        monkeypatch.setenv(name, value)
    asked: list[str] = []
    monkeypatch.setattr(control, "status_rest", lambda dashboard: asked.append(dashboard) or {"applications": {}})
    assert CliRunner().invoke(app, ["serve", "status", "--output", "json"]).exit_code == 0
    assert asked == ["http://keel-serve-head-svc.keel.svc.cluster.local:8265"]
    refused = CliRunner().invoke(app, ["serve", "models:/medical-diagnosis@champion"])
    assert isinstance(refused.exception, control.ServeError)
    assert "RayService keel-serve (KEEL_RAY_SERVICE) serves this cluster's models" in str(refused.exception)
    assert "keel models promote NAME VERSION" in str(refused.exception)
    deleted: list[str] = []
    monkeypatch.setattr(control, "stop_rest", deleted.append)
    stopped = CliRunner().invoke(app, ["serve", "stop"])
    assert isinstance(stopped.exception, control.ServeError) and deleted == []
    assert "would delete its Serve applications behind KubeRay's back" in str(stopped.exception)
