"""keel serve (Ray Serve, HAProxy ingress, dynamic batching) against plain FastAPI + uvicorn.

Both serve the same registered model with the same app code; the same
closed-loop load generator (32 concurrent clients, single-row predict
requests, loopback only) drives each for a fixed time. Prints one JSON report
as its last line: req/s, p50 and p99 for each, and their ratios.
Goal: keel serve >= 0.9x FastAPI's req/s, with p99 <= 1.5x FastAPI's p99.

A third run serves the same model with a shadow (``--shadow``, the model
itself as the challenger) and reports what copying every request costs, as
ratios to keel serve without one, and how many copies were compared or
skipped. On a small machine the shadow's replica shares the CPUs with the
champion's, so this is the cost at its highest; on a cluster it gets its own.
A fourth serves it with a canary (``--canary``, the model itself, weight 0.5):
half the requests take one more hop, through a Serve handle to the canary's
replica, and are counted by outcome.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CLIENTS, WARMUP_S, DURATION_S = 32, 3.0, 10.0
REPO = Path(__file__).resolve().parents[2]


async def closed_loop(url: str, body: bytes) -> dict[str, float]:
    """Each client sends its next request as soon as the last one answers; bounded by time."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    deadline_warm = time.perf_counter() + WARMUP_S
    deadline = deadline_warm + DURATION_S

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while (now := time.perf_counter()) < deadline:
            async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
                await response.read()
                if now >= deadline_warm:
                    latencies.append(time.perf_counter() - now)
                    errors += response.status != 200

    connector = aiohttp.TCPConnector(limit=CLIENTS)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(CLIENTS)))
    latencies.sort()
    return {"requests_per_s": round(len(latencies) / DURATION_S, 1), "errors": errors,
            "p50_ms": round(1000 * latencies[len(latencies) // 2], 2),
            "p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 2)}


def wait_ready(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def keel(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "keel", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return result.stdout


UVICORN = """
import uvicorn
from keel.serve.app import build_app
from keel.serve.deployment import load_registered
from keel.settings import load_settings
model = load_registered("models:/small-model@champion", load_settings())
uvicorn.run(build_app(model.predictor, model.name, model.version), host="127.0.0.1", port={port}, log_level="warning")
"""


def keel_serve_under_load(path: str, body: bytes, *options: str,
                          counter: str = "keel_shadow_copies_total") -> tuple[dict[str, float], dict[str, float]]:
    """The load on a detached `keel serve`, and its ``counter`` by outcome (empty without a challenger)."""
    from tests.integration.conftest import free_port

    port = free_port()
    keel("serve", "models:/small-model@champion", "--detach", "--port", str(port), *options)
    try:
        wait_ready(f"http://127.0.0.1:{port}/v2/health/ready")
        result = asyncio.run(closed_loop(f"http://127.0.0.1:{port}{path}", body))
        time.sleep(3)  # the last copies are compared after their answers went out
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            metrics = response.read().decode()
    finally:
        keel("serve", "stop")
    copies = {line.split('outcome="')[1].split('"')[0]: float(line.split()[-1]) for line in metrics.splitlines()
              if line.startswith(counter + "{")}
    return result, copies


def main() -> None:
    sys.path.insert(0, str(REPO))
    from keel import storage
    from keel.registry import register
    from keel.settings import load_settings
    from tests.conftest import small_frame
    from tests.integration.conftest import free_port
    from tests.stages import run_stages, small_config, write_small_source

    with tempfile.TemporaryDirectory(prefix="keel-bench-serving-") as scratch:
        os.environ["KEEL_HOME"] = str(Path(scratch) / ".keel")
        settings = load_settings()
        uris = run_stages(settings, "bench", write_small_source(Path(scratch)))
        register(uris["train"], uris["evaluate"], uris["ingest"], uris["preprocess"], small_config().registry, {},
                 "bench", "small", storage.stage_uri(settings, "bench", "register"), settings)
        body = json.dumps({"records": small_frame(1).drop(columns=["outcome"]).to_dict(orient="records")}).encode()
        path = "/v1/models/small-model:predict"

        port = free_port()
        server = subprocess.Popen([sys.executable, "-c", UVICORN.format(port=port)])
        try:
            wait_ready(f"http://127.0.0.1:{port}/v2/health/ready")
            fastapi = asyncio.run(closed_loop(f"http://127.0.0.1:{port}{path}", body))
        finally:
            server.terminate()
            server.wait(timeout=30)

        served, _ = keel_serve_under_load(path, body)
        shadowed, copies = keel_serve_under_load(path, body, "--shadow", "models:/small-model@champion")
        canaried, routed = keel_serve_under_load(path, body, "--canary", "models:/small-model@champion",
                                                 "--canary-weight", "0.5", counter="keel_canary_requests_total")

    report = {"benchmark": "serving", "clients": CLIENTS, "duration_s": DURATION_S,
              "fastapi_uvicorn": fastapi, "keel_serve": served,
              "requests_per_s_ratio": round(served["requests_per_s"] / fastapi["requests_per_s"], 3),
              "p99_ratio": round(served["p99_ms"] / fastapi["p99_ms"], 3),
              "goals": {"requests_per_s_ratio": ">= 0.9", "p99_ratio": "<= 1.5"},
              "keel_serve_with_shadow": {**shadowed, "copies": copies},
              "shadow_requests_per_s_ratio": round(shadowed["requests_per_s"] / served["requests_per_s"], 3),
              "shadow_p99_ratio": round(shadowed["p99_ms"] / served["p99_ms"], 3),
              "keel_serve_with_canary": {**canaried, "canary_requests": routed},
              "canary_requests_per_s_ratio": round(canaried["requests_per_s"] / served["requests_per_s"], 3),
              "canary_p99_ratio": round(canaried["p99_ms"] / served["p99_ms"], 3)}
    report["goals_met"] = report["requests_per_s_ratio"] >= 0.9 and report["p99_ratio"] <= 1.5
    print(json.dumps(report))


if __name__ == "__main__":
    main()
