"""The MLflow pod's metrics container: the sum of what the server's worker processes count."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from keel.monitor.mlflow_metrics import serve_metrics

WORKER = ("from prometheus_client import Counter\n"
          "Counter('mlflow_http_request', 'requests', ['status']).labels(status='200').inc({count})\n")


def test_it_serves_the_sum_over_every_worker(tmp_path: Path) -> None:
    for count in (3, 4):  # two uvicorn workers, each counting into its own file
        subprocess.run([sys.executable, "-c", WORKER.format(count=count)], check=True, timeout=60,
                       env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = serve_metrics(tmp_path, port, "127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        server.shutdown()
    assert 'mlflow_http_request_total{status="200"} 7.0' in text


def test_a_directory_that_is_not_there_is_named(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"nope: no such directory; expected the one `mlflow server "
                                         r"--expose-prometheus` writes"):
        serve_metrics(tmp_path / "nope", 0, "127.0.0.1")
