"""Each step's CPU and memory: Keel's defaults, a config's overrides, and the errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from keel.config import load_pipeline_config
from keel.errors import ConfigError
from keel.resources import DEFAULT_STEP_RESOURCES, cpu_cores, memory_bytes
from pipelines.medical_diagnosis.pipeline import CONFIG_FILE

COMPONENTS = Path(__file__).parents[2] / "components"


def override(tmp_path: Path, resources: dict) -> Path:
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump({"resources": resources}))
    return path


@pytest.mark.parametrize(("quantity", "cores"), [("500m", 0.5), ("2", 2.0), ("0.25", 0.25), ("1500m", 1.5)])
def test_cpu_quantities_read_as_cores(quantity: str, cores: float) -> None:
    assert cpu_cores(quantity) == cores


@pytest.mark.parametrize(("quantity", "size"), [("512Mi", 512 * 2**20), ("4Gi", 4 * 2**30), ("1G", 10**9),
                                                ("1048576", 2**20), ("3K", 3000)])
def test_memory_quantities_read_as_bytes(quantity: str, size: int) -> None:
    assert memory_bytes(quantity) == size


def test_every_component_has_defaults_and_no_default_names_a_step_that_is_gone() -> None:
    steps = {path.parent.name.replace("_", "-") for path in COMPONENTS.glob("*/component.py")}
    assert steps == set(DEFAULT_STEP_RESOURCES)
    for name, resources in DEFAULT_STEP_RESOURCES.items():
        assert None not in (resources.requests.cpu, resources.requests.memory, resources.limits.cpu,
                            resources.limits.memory), f"{name} leaves a request or limit out"


def test_an_override_changes_only_what_it_names(tmp_path: Path) -> None:
    config = load_pipeline_config(CONFIG_FILE, override(tmp_path, {"train": {"limits": {"memory": "16Gi"}},
                                                                   "intent_train": {"requests": {"cpu": "2"}}}))
    trained = config.step_resources("train")
    assert trained.limits.memory == "16Gi"
    assert trained.requests == DEFAULT_STEP_RESOURCES["train"].requests
    assert trained.limits.cpu == DEFAULT_STEP_RESOURCES["train"].limits.cpu
    assert config.step_resources("intent-train").requests.cpu == "2"  # the UI's name or the module's, alike
    assert config.step_resources("evaluate") == DEFAULT_STEP_RESOURCES["evaluate"]


def test_resources_stay_out_of_the_runs_config_parameter(tmp_path: Path) -> None:
    """Pods get their resources when the pipeline is compiled; a run's config parameter could not change them."""
    config = load_pipeline_config(CONFIG_FILE, override(tmp_path, {"train": {"limits": {"memory": "16Gi"}}}))
    assert "resources" not in config.to_json() and "16Gi" not in config.to_json()
    assert config.to_json() == load_pipeline_config(CONFIG_FILE).to_json()


@pytest.mark.parametrize(("resources", "message"), [
    ({"trian": {"limits": {"memory": "8Gi"}}}, "resources: no step named 'trian'; steps are ["),
    ({"train": {"limits": {"memory": "8GB"}}}, "resources.train.limits.memory: '8GB' is not a memory quantity"),
    ({"train": {"requests": {"cpu": "two"}}}, "resources.train.requests.cpu: 'two' is not a CPU quantity"),
    ({"train": {"limit": {"memory": "8Gi"}}}, "resources.train.limit"),
    ({"train": {"requests": {"memory": "16Gi"}, "limits": {"memory": "8Gi"}}},
     "requests.memory 16Gi is above limits.memory 8Gi"),
    ({"train": {"limits": {"memory": "1Gi"}}},  # below the default request of 2Gi
     "resources.train: with Keel's defaults for the rest, requests.memory 2Gi is above limits.memory 1Gi"),
    ({"deploy": {"requests": {"cpu": "1500m"}}}, "requests.cpu 1500m is above limits.cpu 1"),
    ({"train": {"requests": {"nvidia.com/gpu": 1}}}, "requests.nvidia.com/gpu: GPUs go under limits only"),
    ({"train": {"limits": {"nvidia.com/gpu": -1}}}, "resources.train.limits.nvidia.com/gpu"),
])
def test_a_bad_override_fails_on_load_naming_the_field(tmp_path: Path, resources: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_pipeline_config(CONFIG_FILE, override(tmp_path, resources))
    assert "override.yaml" in str(error.value) and message in str(error.value)
