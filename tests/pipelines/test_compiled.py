"""Compiled pipelines are golden files: recompiling must reproduce them byte for byte."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import pipelines
from keel.cli import app
from keel.cli.compile import compile_all
from keel.images import RUNTIME_IMAGE


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {p.stem: p for p in compile_all(tmp_path_factory.mktemp("compiled"))}


@pytest.mark.parametrize("name", sorted(pipelines.PIPELINES))
def test_compiled_yaml_is_current(name: str, fresh: dict[str, Path]) -> None:
    committed = pipelines.COMPILED_DIR / f"{name}.yaml"
    assert committed.exists(), f"{committed} is missing: run `make pipelines` and commit it"
    assert committed.read_text() == fresh[name].read_text(), f"{committed} is stale: run `make pipelines`"


PRIVATE_IMAGE = "registry.example.com:5000/ml/keel-runtime:0.1.0"


def test_steps_can_run_an_image_from_another_registry_and_nothing_else_changes(tmp_path: Path) -> None:
    """`keel pipelines compile --image` (and submit's): every step on the platform team's own build of the
    image; the YAML otherwise what `make pipelines` compiles, header included."""
    from kfp.components import load_component_from_file

    result = CliRunner().invoke(app, ["pipelines", "compile", "--image", PRIVATE_IMAGE, "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for name in pipelines.PIPELINES:
        moved = (tmp_path / f"{name}.yaml").read_text()
        committed = (pipelines.COMPILED_DIR / f"{name}.yaml").read_text()
        assert moved.replace(PRIVATE_IMAGE, RUNTIME_IMAGE) == committed
        spec = next(yaml.safe_load_all(moved))
        assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {PRIVATE_IMAGE}
        load_component_from_file(str(tmp_path / f"{name}.yaml"))  # still KFP IR


@pytest.mark.parametrize("image", ["Keel:latest", "registry.example.com/keel-runtime", "localhost:5000/keel-runtime",
                                   "registry.example.com/keel runtime:1", "keel-runtime@sha256:abc"])
def test_an_image_kfp_cannot_pull_by_a_fixed_name_is_refused_naming_it(image: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["pipelines", "compile", "--image", image, "--output-dir", str(tmp_path)])
    assert result.exit_code == 1 and f"--image {image!r}: expected REGISTRY/PATH:TAG" in str(result.exception)
    assert not list(tmp_path.iterdir())  # nothing compiled


def test_the_golden_files_stay_on_keels_own_image(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_IMAGE", PRIVATE_IMAGE)
    result = CliRunner().invoke(app, ["pipelines", "compile"])
    assert result.exit_code == 1 and "--image: give --output-dir too" in str(result.exception)
    assert "registry.example.com" not in (pipelines.COMPILED_DIR / "medical_diagnosis.yaml").read_text()


@pytest.mark.parametrize("name", sorted(pipelines.PIPELINES))
def test_compiled_yaml_is_valid_kfp_ir(name: str) -> None:
    from kfp.components import load_component_from_file

    path = pipelines.COMPILED_DIR / f"{name}.yaml"
    component = load_component_from_file(str(path))  # parses the IR back into a pipeline spec
    spec, platform = yaml.safe_load_all(path.read_text())  # the pipeline, then its Kubernetes settings
    assert set(platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]) == set(
        spec["deploymentSpec"]["executors"])
    assert component.pipeline_spec.pipeline_info.name == spec["pipelineInfo"]["name"]
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {RUNTIME_IMAGE}
    dags = [spec["root"]["dag"], *(c["dag"] for c in spec["components"].values() if "dag" in c)]
    steps = [(name, task) for dag in dags for name, task in dag["tasks"].items()
             if "executorLabel" in spec["components"][task["componentRef"]["name"]]]
    assert len(steps) == len(executors)
    for task_name, task in steps:
        assert task.get("retryPolicy", {}).get("maxRetryCount", 0) >= 1, f"{task_name} has no retry policy"
        assert task["cachingOptions"] == {}, f"{task_name} caches outputs keyed by another run"
    # whoever starts a run from the compiled YAML reads what each parameter is
    undescribed = [p for p, d in spec["root"]["inputDefinitions"]["parameters"].items() if not d.get("description")]
    assert not undescribed, f"{name}: no description for {undescribed}"


@pytest.mark.parametrize("name", sorted(pipelines.PIPELINES))
def test_local_runs_fail_fast_instead_of_retrying(name: str, tmp_path) -> None:
    """kfp.local honours retry policies; `keel run` builds without them so a bad input fails at once."""
    from kfp import compiler

    target = tmp_path / "local.yaml"
    compiler.Compiler().compile(pipelines.build(name, retries=0), str(target))
    spec = next(yaml.safe_load_all(target.read_text()))
    tasks = [t for c in [spec["root"], *spec["components"].values()] if "dag" in c for t in c["dag"]["tasks"].values()]
    assert tasks and not any("retryPolicy" in t for t in tasks)


def serving_pipelines() -> list[str]:
    """The pipelines with a ``serve`` parameter (batch scoring reads a model and serves none)."""
    return [name for name in sorted(pipelines.PIPELINES) if "serve" in next(yaml.safe_load_all(
        (pipelines.COMPILED_DIR / f"{name}.yaml").read_text()))["root"]["inputDefinitions"]["parameters"]]


@pytest.mark.parametrize("name", serving_pipelines())
def test_every_pipeline_that_serves_previews_a_version_awaiting_approval(name: str) -> None:
    """Under serve=true, a new champion is deployed and a version awaiting approval (registry.approval:
    manual) is deployed beside it (as shadow or canary: registry.preview), whatever kind of model the pipeline
    trains."""
    spec = next(yaml.safe_load_all((pipelines.COMPILED_DIR / f"{name}.yaml").read_text()))
    dags = {"root": spec["root"]["dag"], **{n: c["dag"] for n, c in spec["components"].items() if "dag" in c}}
    branches = {task["taskInfo"]["name"]: dags[task["componentRef"]["name"]]
                for dag in dags.values() for task in dag["tasks"].values() if task["componentRef"]["name"] in dags}

    def deploys_awaiting_approval(dag: dict) -> list[bool]:
        deploys = [t for t in dag["tasks"].values() if t["componentRef"]["name"].startswith("comp-deploy")]
        return [t["inputs"]["parameters"].get("awaiting_approval", {}).get("runtimeValue", {}).get("constant", False)
                for t in deploys]

    assert deploys_awaiting_approval(branches["new-champion"]) == [False]
    assert deploys_awaiting_approval(branches["awaiting-approval"]) == [True]


@pytest.mark.parametrize("retraining, training", [("retrain_when_degraded", "medical_diagnosis"),
                                                   ("retrain_recommendations_when_degraded",
                                                    "ecommerce_recommendations"),
                                                   ("retrain_intents_when_degraded", "customer_service_intents")])
def test_retraining_runs_the_whole_training_pipeline_only_after_a_degraded_check(retraining: str,
                                                                                 training: str) -> None:
    """The check at the root; under retrain=true and the check's degraded output, the training pipeline as one
    sub-DAG, every step of it (so it cannot drift from the pipeline itself)."""
    spec = next(yaml.safe_load_all((pipelines.COMPILED_DIR / f"{retraining}.yaml").read_text()))
    components = spec["components"]

    def only_task(dag: dict) -> tuple[str, str | None]:
        (task,) = dag["tasks"].values()
        return task["componentRef"]["name"], task.get("triggerPolicy", {}).get("condition")

    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"check-performance", "condition-1"}
    # the check holds the training config (the run's `config`, as edited in the Kubeflow form) to the checked model
    assert root["check-performance"]["inputs"]["parameters"]["training_config"] == {"componentInputParameter": "config"}
    assert root["condition-1"]["triggerPolicy"]["condition"] == \
        "inputs.parameter_values['pipelinechannel--retrain'] == true"
    inner, condition = only_task(components["comp-condition-1"]["dag"])
    assert condition == "inputs.parameter_values['pipelinechannel--check-performance-degraded'] == true"
    component = f"comp-{training.replace('_', '-')}"
    assert only_task(components[inner]["dag"]) == (component, None)
    standalone = next(yaml.safe_load_all((pipelines.COMPILED_DIR / f"{training}.yaml").read_text()))
    assert set(components[component]["dag"]["tasks"]) == set(standalone["root"]["dag"]["tasks"])


def _executor_resources(spec: dict) -> dict[str, dict]:
    """Each step's resources in compiled IR, by the step's name (``comp-deploy-2`` is ``deploy``, again)."""
    executors = spec["deploymentSpec"]["executors"]
    return {component["executorLabel"]: executors[component["executorLabel"]]["container"].get("resources", {})
            for component in spec["components"].values() if "executorLabel" in component}


def _step_name(executor_label: str) -> str:
    import re

    return re.sub(r"-\d+$", "", executor_label.removeprefix("exec-"))


@pytest.mark.parametrize("name", sorted(pipelines.PIPELINES))
def test_every_step_requests_and_limits_cpu_and_memory(name: str) -> None:
    """A pod without requests is refused in a namespace with a cpu or memory ResourceQuota, and evicted first."""
    from keel.resources import DEFAULT_STEP_RESOURCES

    spec = next(yaml.safe_load_all((pipelines.COMPILED_DIR / f"{name}.yaml").read_text()))
    for label, resources in _executor_resources(spec).items():
        expected = DEFAULT_STEP_RESOURCES[_step_name(label)]
        assert resources.get("resourceCpuRequest") == expected.requests.cpu, label
        assert resources.get("resourceCpuLimit") == expected.limits.cpu, label
        assert resources.get("resourceMemoryRequest") == expected.requests.memory, label
        assert resources.get("resourceMemoryLimit") == expected.limits.memory, label


def test_a_config_override_resizes_the_steps_it_names_in_the_submitted_pipeline(tmp_path: Path) -> None:
    """`keel submit --config` compiles with the override: the named steps' pods change, no other."""
    from keel.submit import compile_pipeline

    override = tmp_path / "bigger.yaml"
    override.write_text(yaml.safe_dump({"resources": {"train": {"limits": {"memory": "32Gi", "cpu": "8",
                                                                           "nvidia.com/gpu": 1}},
                                                      "check-performance": {"requests": {"memory": "2Gi"}}}}))
    compiled = compile_pipeline(pipelines.build("retrain_when_degraded", override), tmp_path / "out.yaml")
    resized = _executor_resources(next(yaml.safe_load_all(compiled.read_text())))
    default = _executor_resources(next(yaml.safe_load_all(
        (pipelines.COMPILED_DIR / "retrain_when_degraded.yaml").read_text())))
    assert resized.keys() == default.keys()
    changed = {label for label in resized if resized[label] != default[label]}
    assert changed == {"exec-train", "exec-check-performance"}
    assert resized["exec-train"]["resourceMemoryLimit"] == "32Gi" and resized["exec-train"]["resourceCpuLimit"] == "8"
    assert resized["exec-train"]["resourceMemoryRequest"] == default["exec-train"]["resourceMemoryRequest"]
    assert resized["exec-check-performance"]["resourceMemoryRequest"] == "2Gi"
    assert resized["exec-train"]["accelerator"] == {"count": "1", "resourceCount": "1",  # old and new KFP's fields
                                                    "type": "nvidia.com/gpu", "resourceType": "nvidia.com/gpu"}
    assert not any("accelerator" in resources for resources in default.values())


def test_compile_with_a_config_writes_the_named_pipelines_for_the_kubeflow_ui(tmp_path: Path) -> None:
    """What a platform team uploads by hand: the named pipeline only, with its steps resized."""
    override = tmp_path / "bigger.yaml"
    override.write_text("resources: {train: {limits: {memory: 16Gi}}}\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["pipelines", "compile", "medical_diagnosis", "--config", str(override),
                                      "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.iterdir()] == ["medical_diagnosis.yaml"]
    resized = _executor_resources(next(yaml.safe_load_all((out / "medical_diagnosis.yaml").read_text())))
    default = _executor_resources(next(yaml.safe_load_all(
        (pipelines.COMPILED_DIR / "medical_diagnosis.yaml").read_text())))
    assert resized["exec-train"]["resourceMemoryLimit"] == "16Gi"
    assert {label for label in resized if resized[label] != default[label]} == {"exec-train"}


@pytest.mark.parametrize(("arguments", "message"), [
    (["--config", "bigger.yaml", "--output-dir", "out"], "--config: name the pipelines it is for"),
    (["medical_diagnosis", "--config", "bigger.yaml"], "--config: give --output-dir too"),
    (["medical_diagnosis", "--config", "bigger.yaml", "--output-dir", "out"],
     "resources.tune: with Keel's defaults for the rest, requests.cpu 8 is above limits.cpu 4"),
    # medical_diagnosis, compiled first, takes a tune section; model_performance has none: neither is written
    (["medical_diagnosis", "model_performance", "--config", "tuned.yaml", "--output-dir", "out"],
     "model_performance/config.yaml): invalid pipeline config: tune: Extra inputs are not permitted"),
    (["medical_diagnosis", "medical_diagnosiss", "--output-dir", "out"], "unknown pipeline 'medical_diagnosiss'"),
])
def test_compile_refuses_what_it_cannot_write_and_writes_nothing(arguments: list[str], message: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bigger.yaml").write_text("resources: {tune: {requests: {cpu: '8'}}}\n")
    (tmp_path / "tuned.yaml").write_text("tune: {num_samples: 3}\n")
    before = {p: p.read_text() for p in pipelines.COMPILED_DIR.iterdir()}
    result = CliRunner().invoke(app, ["pipelines", "compile", *arguments])
    assert result.exit_code == 1 and message in str(result.exception), result.output
    assert not (tmp_path / "out").exists()
    assert {p: p.read_text() for p in pipelines.COMPILED_DIR.iterdir()} == before
