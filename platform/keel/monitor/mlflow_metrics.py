"""The MLflow tracking server's Prometheus metrics, served beside it.

``mlflow server --expose-prometheus DIR`` has each of its uvicorn workers count requests (by method and
status, with latency histograms) into files under DIR, prometheus_client's multiprocess mode, and adds their sum
at ``/metrics`` on the API port. With the chart's basic-auth app on, that route asks for MLflow credentials,
which Prometheus should not hold. So the chart's MLflow pod runs this in a container of its own: it reads DIR (an
emptyDir both containers mount) and answers on a metrics port of its own, which only the namespaces Prometheus
scrapes from reach (``networkPolicy.metricsNamespaces``).
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from typing import Any

DEFAULT_PORT = 9102


def serve_metrics(directory: Path, port: int = DEFAULT_PORT, host: str = "0.0.0.0") -> Any:
    """Answer ``/metrics`` on ``host:port`` with the sum of what the processes writing to ``directory`` count;
    returns the running server (``shutdown()`` stops it)."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    if not directory.is_dir():
        raise SystemExit(f"{directory}: no such directory; expected the one `mlflow server --expose-prometheus` "
                         "writes its workers' metrics to.")
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m keel.monitor.mlflow_metrics", description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path, help="where `mlflow server --expose-prometheus` writes metrics")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--host", default="0.0.0.0")
    arguments = parser.parse_args(argv)
    server = serve_metrics(arguments.directory, arguments.port, arguments.host)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())  # the pod's shutdown: end at once, exit 0
    try:
        stopped.wait()
    except KeyboardInterrupt:
        pass
    server.shutdown()


if __name__ == "__main__":
    main()
