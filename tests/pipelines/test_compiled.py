"""Compiled pipelines are golden files: recompiling must reproduce them byte for byte."""

from pathlib import Path

import pytest
import yaml

import pipelines
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


@pytest.mark.parametrize("name", sorted(pipelines.PIPELINES))
def test_compiled_yaml_is_valid_kfp_ir(name: str) -> None:
    from kfp.components import load_component_from_file

    path = pipelines.COMPILED_DIR / f"{name}.yaml"
    component = load_component_from_file(str(path))  # parses the IR back into a pipeline spec
    spec = yaml.safe_load(path.read_text())
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
