"""A registered model served by real Ray Serve on 127.0.0.1, loaded from a real MLflow registry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from keel.serve.config import ServeConfig
from keel.serve.deployment import deploy
from keel.settings import load_settings
from tests.conftest import small_frame
from tests.integration.conftest import free_port
from tests.stages import register_small_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NAME = "small-model"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import ray
    from ray import serve

    home = tmp_path_factory.mktemp("serve") / ".keel"
    patch = pytest.MonkeyPatch()
    patch.setenv("KEEL_HOME", str(home))
    settings = load_settings()
    register_small_model(settings, "serve")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield deploy(f"models:/{NAME}@champion", ServeConfig(port=free_port(), max_batch_size=16,
                                                               batch_wait_timeout_s=0.01))
    finally:
        serve.shutdown()
        ray.shutdown()
        patch.undo()


def records(rows: int) -> list[dict]:
    return small_frame(rows).drop(columns=["outcome"]).to_dict(orient="records")


def test_serves_the_champion_version(served: str) -> None:
    response = httpx.post(f"{served}/v1/models/{NAME}:predict", json={"records": records(3)}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["x-model-version"] == "1" and len(response.json()["predictions"]) == 3
    assert httpx.get(f"{served}/v2/health/ready", timeout=10).json() == {"ready": True}


def test_malformed_requests_are_4xx_through_ray_serve(served: str) -> None:
    bad = httpx.post(f"{served}/v1/models/{NAME}:predict", content=b"{nope", timeout=10,
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400
    missing = httpx.post(f"{served}/v2/models/{NAME}/infer", json={"inputs": [
        {"name": "size", "shape": [1], "datatype": "FP64", "data": [1.0]}]}, timeout=10)
    assert missing.status_code == 400 and "missing input(s)" in missing.json()["error"]
    assert httpx.post(f"{served}/v1/models/{NAME}:predict", json={"records": records(1)}, timeout=10).status_code == 200


def test_concurrent_requests_are_batched(served: str) -> None:
    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            responses = await asyncio.gather(*(client.post(f"{served}/v1/models/{NAME}:predict",
                                                           json={"records": records(1)}) for _ in range(48)))
        return [r.status_code for r in responses]

    assert set(asyncio.run(burst())) == {200}
    metrics = httpx.get(f"{served}/metrics", timeout=10).text
    count = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("keel_batch_size_count")))
    total = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("keel_batch_size_sum")))
    assert total / count > 1.5, "concurrent single-row requests should share forward passes"


def test_prometheus_scrapes_the_served_model(served: str, tmp_path: Path) -> None:
    """A real Prometheus (Debian package) scrapes the server; PromQL sees counters and histograms move."""
    from tests.integration.conftest import start_service

    target = served.split("//")[1]
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        f"scrape_configs: [{{job_name: keel, static_configs: [{{targets: ['{target}']}}]}}]\n")
    port = free_port()
    prometheus = start_service(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                               port, tmp_path)

    def query(promql: str) -> float:
        result = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": promql}, timeout=10).json()
        values = result["data"]["result"]
        return float(values[0]["value"][1]) if values else 0.0

    try:
        before = query('sum(keel_requests_total{code="200"})')
        for _ in range(20):  # 200 rows: what a drift score waits for
            httpx.post(f"{served}/v1/models/{NAME}:predict", json={"records": records(10)}, timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and query('sum(keel_requests_total{code="200"})') < before + 20:
            time.sleep(1)
        assert query('sum(keel_requests_total{code="200"})') >= before + 20
        assert query('sum(keel_request_duration_seconds_count{route="/v1/models/{name}:predict"})') >= 20
        assert query("sum(keel_predictions_total)") >= 40
        assert query(f'keel_model_info{{model="{NAME}",version="1"}}') == 1
        assert query('count(keel_feature_drift_psi)') >= 2
        assert query(f'count(keel_prediction_drift_psi{{model="{NAME}",version="1"}})') == 1  # registered with it
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=10)


def test_overload_gets_a_fast_503_with_retry_after(served: str) -> None:
    """A second app with a four-request queue: the excess is refused at once, the queued ones served.

    Ray Serve's router counts a request as queued until it is assigned to a replica and may reject more than
    strictly necessary (its own comment in ``Router.wrap_request_assignment``): with a one-request queue the
    whole burst after the first was refused once on a loaded CI machine (1 x 200, 39 x 503). Four queue slots
    always hold at least two requests to serve.
    """
    from ray import serve

    from keel.serve.deployment import build_application

    config = ServeConfig(max_ongoing_requests=1, max_queued_requests=4, batch_wait_timeout_s=0.05, retry_after_s=2)
    serve.run(build_application(f"models:/{NAME}@champion", config), name="tight", route_prefix="/tight")
    url = f"{served}/tight/v1/models/{NAME}:predict"

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.post(url, json={"records": records(1)}) for _ in range(40)))

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and codes.count(503) >= 10 and codes.count(200) >= 2
    assert all(r.headers.get("retry-after") == "2" for r in responses if r.status_code == 503)
    assert httpx.post(url, json={"records": records(1)}, timeout=30).status_code == 200
    serve.delete("tight")


def test_deployed_with_a_shadow_the_model_copies_its_rows_to_it(served: str) -> None:
    """`keel serve --shadow` in the foreground: both apps through ``deploy``, the shadow without a route."""
    from ray import serve

    port = int(served.rsplit(":", 1)[1])
    deploy(f"models:/{NAME}@champion", ServeConfig(port=port, max_batch_size=16, batch_wait_timeout_s=0.01),
           shadow_uri=f"models:/{NAME}/1")
    try:
        for _ in range(10):
            response = httpx.post(f"{served}/v1/models/{NAME}:predict", json={"records": records(2)}, timeout=30)
            assert response.status_code == 200 and response.headers["x-model-version"] == "1"
        compared, deadline = 0.0, time.monotonic() + 30
        while compared < 20 and time.monotonic() < deadline:  # copies are compared after the answers went out
            metrics = httpx.get(f"{served}/metrics", timeout=10).text
            compared = sum(float(line.split()[-1]) for line in metrics.splitlines()
                           if line.startswith("keel_shadow_rows_total{") and 'agreement="same"' in line)
            time.sleep(0.5)
        assert compared == 20  # the model shadowing itself agrees on every row
        assert serve.status().applications["keel-shadow"].status == "RUNNING"
    finally:
        deploy(f"models:/{NAME}@champion", ServeConfig(port=port, max_batch_size=16, batch_wait_timeout_s=0.01))
        serve.delete("keel-shadow")
