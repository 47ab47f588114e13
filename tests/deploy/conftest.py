"""Renders shared by the chart tests: each one once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy import render

CI_VALUES = sorted((render.CHART / "ci").glob("*-values.yaml"))
# Every shape the chart renders in: defaults, defaults on a cluster with the
# Prometheus operator, and each ci/*-values.yaml.
SHAPES = ["default", "default+monitoring", *(p.stem for p in CI_VALUES)]
OVERLAYS = ["base", *(f"overlays/{name}" for name in render.OVERLAYS)]


def render_shape(shape: str) -> str:
    if shape == "default":
        return render.helm_template()
    if shape == "default+monitoring":
        return render.helm_template(None, (render.MONITORING_API,))
    return render.helm_template(render.CHART / "ci" / f"{shape}.yaml")


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every chart shape and every kustomize overlay, rendered to a file."""
    directory = tmp_path_factory.mktemp("rendered")
    files = {}
    for shape in SHAPES:
        files[shape] = directory / f"chart-{shape}.yaml"
        files[shape].write_text(render_shape(shape))
    for overlay in OVERLAYS:
        files[overlay] = directory / f"kustomize-{overlay.replace('/', '-')}.yaml"
        files[overlay].write_text(render.kustomize(render.MANIFESTS / overlay))
    return files
