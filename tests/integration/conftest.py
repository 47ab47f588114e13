"""Services the integration tests start themselves, on 127.0.0.1 only."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from keel.serve.control import HeadPorts

if TYPE_CHECKING:
    from minio import Minio


# moto accepts any key; a distinctive one lets tests look for it in logs, where it must never appear.
S3_SECRET = "keel-test-s3-secret-5b1e9f"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def private_head_ports() -> HeadPorts:
    """Free ports instead of Ray's fixed defaults, so a test's `ray start --head` can run beside another's."""
    return HeadPorts(dashboard=free_port(), client_server=free_port(), dashboard_agent=free_port())


def wait_for_port(port: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout_s} s")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 HTTP API (moto's server) on a free loopback port, for the session."""
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


def s3_client(endpoint: str) -> Minio:
    """A client of the test S3 server, with the key the tests hand out."""
    from minio import Minio

    return Minio(endpoint.split("//")[1], access_key="testing", secret_key=S3_SECRET, secure=False)


@pytest.fixture
def s3_env(s3_endpoint: str, keel_home: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """KEEL_* settings for an artifact root in a fresh bucket on the S3 server."""
    bucket = f"keel-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    env = {"KEEL_S3_ENDPOINT": s3_endpoint, "KEEL_S3_ACCESS_KEY": "testing", "KEEL_S3_SECRET_KEY": S3_SECRET,
           "KEEL_ARTIFACT_ROOT": f"s3://{bucket}/keel"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s3_client(s3_endpoint).make_bucket(bucket)
    return {**env, "bucket": bucket}


def start_service(command: list[str], port: int, log_dir: Path) -> subprocess.Popen:
    """A Debian-packaged service (Prometheus, Pushgateway) on 127.0.0.1:port, logging to log_dir."""
    binary = shutil.which(command[0])
    if binary is None:
        pytest.fail(f"{command[0]} is missing: `make test` installs it from Debian (see Makefile system-deps)")
    log = (log_dir / f"{Path(command[0]).name}.log").open("w")
    process = subprocess.Popen([binary, *command[1:]], stdout=log, stderr=subprocess.STDOUT)
    wait_for_port(port)
    return process


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    process = start_service(["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{port}"], port, tmp_path)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)
