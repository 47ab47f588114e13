"""Canary serving's moving parts without Ray: routing, falling back, the fit check, the config and graduation.
How a champion's app hands requests to a real canary app is in test_app.py."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from keel.errors import ConfigError
from keel.serve.canary import (CanaryAnswer, CanaryCall, CanaryMetrics, CanaryRouter, ForwardedRequest,
                               check_canary_fits)
from keel.serve.challenger import CANARY_APP, SHADOW_APP, SERVER_BUILDER, without_challengers_serving
from keel.serve.config import CanaryConfig, with_canary

REQUEST = ForwardedRequest("POST", "/v1/models/m:predict", [("content-type", "application/json")], b"{}")


def router_over(call: CanaryCall, config: CanaryConfig = CanaryConfig(weight=0.5), retry_s: float = 5.0,
                clock: Callable[[], float] | None = None, rng: random.Random | None = None) -> CanaryRouter:
    async def connect() -> CanaryCall:
        return call
    return router_connecting(connect, config, retry_s, clock, rng)


def router_connecting(connect: Callable, config: CanaryConfig = CanaryConfig(weight=0.5), retry_s: float = 5.0,
                      clock: Callable[[], float] | None = None, rng: random.Random | None = None) -> CanaryRouter:
    extra = {"clock": clock} if clock else {}
    return CanaryRouter(connect, config, CanaryMetrics(CollectorRegistry(), "m", "1"), retry_s=retry_s, rng=rng,
                        **extra)


def requests(router: CanaryRouter, outcome: str) -> float | None:
    return router.metrics.registry.get_sample_value("keel_canary_requests_total",
                                                    {"model": "m", "version": "1", "outcome": outcome})


def answering(status: int, body: bytes = b'{"model_version": "2"}') -> CanaryCall:
    async def call(request: ForwardedRequest) -> CanaryAnswer:
        return CanaryAnswer(status, [("x-model-version", "2")], body)
    return call


def test_a_routing_key_always_meets_the_same_version_and_keys_split_by_the_weight() -> None:
    router = router_over(answering(200), CanaryConfig(weight=0.2))
    keys = [f"user-{i}" for i in range(20_000)]
    first = [router.chosen(key) for key in keys]
    assert first == [router.chosen(key) for key in keys]  # sticky: the hash decides, not a draw
    assert sum(first) / len(keys) == pytest.approx(0.2, abs=0.01)


def test_without_a_key_a_share_of_requests_goes_to_the_canary() -> None:
    router = router_over(answering(200), CanaryConfig(weight=0.3), rng=random.Random(7))
    draws = random.Random(7)
    chosen = [router.chosen(None) for _ in range(10_000)]
    assert chosen == [draws.random() < 0.3 for _ in range(10_000)]
    assert sum(chosen) / len(chosen) == pytest.approx(0.3, abs=0.02)


@pytest.mark.parametrize("status, outcome", [(200, "answered"), (422, "rejected")])
def test_the_canarys_answer_goes_back_as_it_is_a_4xx_included(status: int, outcome: str) -> None:
    router = router_over(answering(status))
    answer = asyncio.run(router.answer(REQUEST))
    assert answer is not None and answer.status == status and answer.headers == [("x-model-version", "2")]
    assert requests(router, outcome) == 1 and requests(router, "fell_back") == 0
    assert router.metrics.registry.get_sample_value("keel_canary_duration_seconds_count",
                                                    {"model": "m", "version": "1"}) == 1


def failing(error: BaseException) -> CanaryCall:
    async def call(request: ForwardedRequest) -> CanaryAnswer:
        raise error
    return call


async def too_slow(request: ForwardedRequest) -> CanaryAnswer:
    await asyncio.sleep(5)
    return CanaryAnswer(200, [], b"")


@pytest.mark.parametrize("call", [answering(503, b"overloaded"), answering(500), failing(RuntimeError("died")),
                                  too_slow], ids=["503", "500", "raises", "times-out"])
def test_a_failing_canary_leaves_the_request_to_the_champion(call: CanaryCall,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    router = router_over(call, CanaryConfig(weight=0.5, timeout_s=0.05))

    async def twice() -> list[CanaryAnswer | None]:
        return [await router.answer(REQUEST), await router.answer(REQUEST)]

    assert asyncio.run(twice()) == [None, None]
    assert requests(router, "fell_back") == 2 and requests(router, "answered") == 0
    assert len([r for r in caplog.records if "champion answered" in r.getMessage()]) == 1  # once a minute


def test_with_no_canary_app_the_champion_answers_and_the_lookup_waits_before_retrying() -> None:
    now, attempts = [0.0], []

    async def connect() -> CanaryCall:
        attempts.append(now[0])
        if now[0] < 10:
            raise ValueError("Application 'keel-canary' does not exist")
        return answering(200)

    router = router_connecting(connect, retry_s=5.0, clock=lambda: now[0])
    assert asyncio.run(router.answer(REQUEST)) is None
    now[0] = 3.0
    assert asyncio.run(router.answer(REQUEST)) is None  # too soon to look again
    assert attempts == [0.0] and requests(router, "unavailable") == 2
    now[0] = 12.0
    answer = asyncio.run(router.answer(REQUEST))
    assert answer is not None and answer.status == 200 and attempts == [0.0, 12.0]


@pytest.mark.parametrize("weight", [0, 1, 1.5, -0.1])
def test_a_canary_takes_some_of_the_traffic_not_none_or_all(weight: float) -> None:
    with pytest.raises(ValidationError, match="weight"):
        CanaryConfig(weight=weight)


def test_a_canary_must_take_the_champions_requests_as_they_are() -> None:
    check_canary_fits("tabular classifier", ["a", "b"], "tabular classifier", ["b", "a"], "models:/m/1", "models:/m/2")
    check_canary_fits("recommender of int user ids", ["user_id", "k"], "recommender of int user ids",
                      ["user_id", "k"], "models:/r/1", "models:/r/2")
    with pytest.raises(ConfigError, match=r"models:/m/2 would answer 422 .* it needs \['c'\], which they lack; "
                                          r"they carry \['a'\], which it refuses"):
        check_canary_fits("tabular classifier", ["a", "b"], "tabular classifier", ["b", "c"], "models:/m/1",
                          "models:/m/2")
    with pytest.raises(ConfigError, match="models:/t/2 is a text classifier and models:/m/1 a tabular classifier"):
        check_canary_fits("tabular classifier", ["a"], "text classifier", ["text"], "models:/m/1", "models:/t/2")
    with pytest.raises(ConfigError, match="models:/r/2 is a recommender of str user ids and models:/r/1 a recommender "
                                          "of int user ids"):
        check_canary_fits("recommender of int user ids", ["user_id", "k"], "recommender of str user ids",
                          ["user_id", "k"], "models:/r/1", "models:/r/2")


def test_a_new_canary_replaces_the_old_one_with_its_weight_keeping_its_serving_settings() -> None:
    alone = [{"name": "keel", "args": {"model_uri": "models:/m/1", "config": {"replicas": 2, "canary": None}}}]
    first = with_canary(alone, "keel", "models:/m/2", CanaryConfig(weight=0.1))
    assert [a["name"] for a in first] == ["keel", CANARY_APP]
    assert first[0]["args"]["config"] == {"replicas": 2, "canary": {"weight": 0.1, "timeout_s": 2.0}}
    assert first[1] == {"name": CANARY_APP, "route_prefix": None, "import_path": SERVER_BUILDER,
                        "args": {"model_uri": "models:/m/2", "config": {}}}
    first[1]["args"]["config"] = {"replicas": 3}
    second = with_canary(first, "keel", "models:/m/3", CanaryConfig(weight=0.5))
    assert second[1]["args"] == {"model_uri": "models:/m/3", "config": {"replicas": 3}}
    assert second[0]["args"]["config"]["canary"]["weight"] == 0.5


def test_promoting_the_canarys_version_graduates_it_and_a_shadow_of_another_version_stays() -> None:
    versions = {"models:/m/2": "2", "models:/m@challenger": "2", "models:/m/3": "3"}
    applications = [
        {"name": "keel", "args": {"model_uri": "models:/m/1", "config": {"canary": {"weight": 0.2}, "shadow": {}}}},
        {"name": SHADOW_APP, "args": {"model_uri": "models:/m/3"}},
        {"name": CANARY_APP, "args": {"model_uri": "models:/m/2"}}]
    kept = without_challengers_serving(applications, "keel", "models:/m@challenger",
                                         lambda first, second: versions[first] == versions[second])
    assert [a["name"] for a in kept] == ["keel", SHADOW_APP]
    assert kept[0]["args"]["config"] == {"shadow": {}}


def test_the_serve_config_with_a_canary_is_one_ray_accepts() -> None:
    from ray.serve.schema import ServeDeploySchema

    from keel.serve.control import serve_config_document
    from keel.serve.config import ServeConfig

    document = serve_config_document("models:/m@champion", ServeConfig(canary=CanaryConfig(weight=0.25)),
                                     canary_uri="models:/m/5", canary_config=ServeConfig(replicas=2))
    champion, canary = ServeDeploySchema.model_validate(document).applications
    assert canary.name == CANARY_APP and canary.route_prefix is None and canary.import_path == champion.import_path
    assert ServeConfig.model_validate(champion.args["config"]).canary == CanaryConfig(weight=0.25)
    assert ServeConfig.model_validate(canary.args["config"]) == ServeConfig(replicas=2)  # a canary routes nothing
