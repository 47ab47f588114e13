"""Loading a registered model as MLflow's own tools do (`mlflow models serve`, KServe): in a Python where keel
is not installed and only the packages the model's requirements bring can be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# `python -S` reads no site-packages (nor the editable install's hook that makes keel importable); the
# packages the model requires are put back on the path by hand.
LOAD_WITHOUT_KEEL = """
import importlib.util, json, sys
sys.path.append(sys.argv[1])
assert importlib.util.find_spec("keel") is None, "keel is importable"
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[2])
answers = model.predict(pd.read_json(sys.argv[3], orient="records"), params=json.loads(sys.argv[4]) or None)
print(answers.to_json(orient="records"))
"""


def score_without_keel(model_uri: str, rows: pd.DataFrame, tracking_uri: str, scratch: Path,
                       params: dict[str, Any] | None = None) -> pd.DataFrame:
    """``model_uri``'s answers to ``rows`` from a process that can import only what the model's requirements
    install (keel's code it has from the model's own copy)."""
    scratch.mkdir(parents=True, exist_ok=True)
    rows.to_json(scratch / "rows.json", orient="records")
    mlflow.set_tracking_uri(tracking_uri)
    requirements = model_requirements(Path(mlflow.pyfunc.get_model_dependencies(model_uri)))
    packages = packages_of(requirement_closure(requirements), scratch / "site-packages")
    loaded = subprocess.run(
        [sys.executable, "-S", "-c", LOAD_WITHOUT_KEEL, str(packages), model_uri, str(scratch / "rows.json"),
         json.dumps(params or {})],
        capture_output=True, text=True, cwd=scratch, timeout=600, check=False,
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    return pd.DataFrame(json.loads(loaded.stdout.strip().splitlines()[-1]))


def model_requirements(requirements_file: Path) -> list[str]:
    """The pip requirements MLflow wrote beside a model."""
    return requirements_file.read_text().split()


def requirement_closure(requirements: list[str]) -> set[str]:
    """Every distribution pip installs for ``requirements``, read from this environment's metadata."""
    closure: set[str] = set()
    waiting = [Requirement(line).name for line in requirements]
    while waiting:
        name = canonicalize_name(waiting.pop())
        if name in closure:
            continue
        closure.add(name)
        try:
            needs = distribution(name).requires or []
        except PackageNotFoundError:
            continue
        for line in needs:
            needed = Requirement(line)
            if needed.marker is None or needed.marker.evaluate({"extra": ""}):
                waiting.append(needed.name)
    return closure


def packages_of(distributions: set[str], directory: Path) -> Path:
    """A site-packages of links to these distributions' top-level modules in this environment's (keel's
    never): what a fresh virtualenv with just them would import. A namespace package (google, opentelemetry)
    is linked whole, with its other distributions' parts."""
    installed = Path(sysconfig.get_paths()["purelib"])
    directory.mkdir(parents=True, exist_ok=True)
    for name in sorted(distributions - {"keel"}):
        try:
            files = distribution(name).files or []
        except PackageNotFoundError:
            continue
        for top in sorted({Path(file).parts[0] for file in files}):
            source = installed / top
            if top not in ("..", "__pycache__") and not top.endswith(".pth") and source.exists() \
                    and not (directory / top).exists():
                (directory / top).symlink_to(source)
    return directory
