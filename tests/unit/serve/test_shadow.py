"""Shadow serving's moving parts without Ray: the mirror, the fit check, the config and the graduation."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
from prometheus_client import CollectorRegistry

from keel.errors import ConfigError
from keel.serve.challenger import SHADOW_APP, without_challengers_serving
from keel.serve.config import ShadowConfig, with_shadow
from keel.serve.shadow import ShadowCall, ShadowMetrics, ShadowMirror, check_shadow_fits

FRAME = pd.DataFrame({"size": [1.0, 2.0, 3.0]})
CHAMPION = np.asarray(["no", "yes", "no"], dtype=object)


def mirror_over(call: ShadowCall, config: ShadowConfig = ShadowConfig(), rng: random.Random | None = None) -> ShadowMirror:
    async def connect() -> ShadowCall:
        return call
    return ShadowMirror(connect, config, ShadowMetrics(CollectorRegistry(), "m", "1"), rng=rng)


def copies(mirror: ShadowMirror, outcome: str) -> float | None:
    return mirror.metrics.registry.get_sample_value("keel_shadow_copies_total",
                                                    {"model": "m", "version": "1", "outcome": outcome})


def rows(mirror: ShadowMirror, agreement: str, shadow_version: str = "2") -> float:
    value = mirror.metrics.registry.get_sample_value("keel_shadow_rows_total", {
        "model": "m", "version": "1", "shadow_version": shadow_version, "agreement": agreement})
    return value or 0.0


async def settled(mirror: ShadowMirror) -> None:
    while mirror.pending:
        await asyncio.gather(*mirror.pending)


def answering(labels: list[str], gate: asyncio.Event | None = None) -> ShadowCall:
    async def call(frame: pd.DataFrame) -> tuple[str, list[str]]:
        if gate is not None:
            await gate.wait()
        return "2", labels
    return call


def test_a_copy_is_compared_row_by_row_after_the_caller_has_its_answer() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        mirror = mirror_over(answering(["no", "no", "no"], gate))
        mirror.submit(FRAME, CHAMPION)  # returns while the shadow has not answered
        await asyncio.sleep(0.01)
        assert len(mirror.pending) == 1 and rows(mirror, "same") == 0
        gate.set()
        await settled(mirror)
        assert (rows(mirror, "same"), rows(mirror, "different")) == (2, 1)
        assert copies(mirror, "compared") == 1
        assert mirror.metrics.registry.get_sample_value("keel_shadow_duration_seconds_count",
                                                        {"model": "m", "version": "1"}) == 1
    asyncio.run(scenario())


def test_a_recommenders_shadow_is_compared_by_ranked_list_and_by_overlap() -> None:
    champion = np.empty(3, dtype=object)
    champion[:] = [(1, 2, 3, 4), (5, 6), (7, 8, 9, 10)]  # a user with few unseen items left gets fewer

    async def scenario() -> ShadowMirror:
        mirror = mirror_over(answering([(1, 2, 3, 4), (6, 5), (7, 11, 12, 13)]))  # the same, reordered, 1 of 4
        mirror.submit(pd.DataFrame({"user_id": [1, 2, 3], "k": 4}), champion)
        await settled(mirror)
        return mirror

    mirror = asyncio.run(scenario())
    assert (rows(mirror, "same"), rows(mirror, "different")) == (1, 2)
    labels = {"model": "m", "version": "1", "shadow_version": "2"}
    registry = mirror.metrics.registry
    assert registry.get_sample_value("keel_shadow_top_k_overlap_count", labels) == 3
    assert registry.get_sample_value("keel_shadow_top_k_overlap_sum", labels) == pytest.approx(1 + 1 + 0.25)
    assert registry.get_sample_value("keel_shadow_top_k_overlap_bucket", {**labels, "le": "0.3"}) == 1


def failing(exception: BaseException) -> ShadowCall:
    async def call(frame: pd.DataFrame) -> tuple[str, list[str]]:
        raise exception
    return call


async def too_slow(frame: pd.DataFrame) -> tuple[str, list[str]]:
    await asyncio.sleep(5)
    return "2", ["no"] * len(frame)


@pytest.mark.parametrize("call", [failing(RuntimeError("replica died")), too_slow, answering(["no"])],
                         ids=["raises", "times-out", "wrong-row-count"])
def test_a_shadow_that_fails_is_counted_and_nothing_is_raised(call: ShadowCall,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> ShadowMirror:
        mirror = mirror_over(call, ShadowConfig(timeout_s=0.05))
        mirror.submit(FRAME, CHAMPION)
        mirror.submit(FRAME, CHAMPION)
        await settled(mirror)
        return mirror

    mirror = asyncio.run(scenario())
    assert copies(mirror, "failed") == 2 and copies(mirror, "compared") == 0
    assert rows(mirror, "same") + rows(mirror, "different") == 0
    assert len([r for r in caplog.records if "shadow failed" in r.getMessage()]) <= 1  # once a minute at most


def test_a_failure_is_logged_without_the_rows_another_librarys_message_may_quote() -> None:
    from keel.errors import DataError
    from keel.serve.challenger import described as _described

    leaky = ValueError("could not tokenize 'Hi, this is Grace, grace@example.com'")
    assert _described(leaky, 2.0) == "ValueError"
    assert _described(DataError("input is missing column(s) ['size']"), 2.0) == (
        "DataError: input is missing column(s) ['size']")
    assert _described(asyncio.TimeoutError(), 0.5) == "no answer within timeout_s=0.5 s"


def test_copies_beyond_max_in_flight_are_skipped_not_queued() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        mirror = mirror_over(answering(["no", "no", "no"], gate), ShadowConfig(max_in_flight=2))
        for _ in range(5):
            mirror.submit(FRAME, CHAMPION)
        assert len(mirror.pending) == 2 and copies(mirror, "skipped") == 3
        gate.set()
        await settled(mirror)
        assert copies(mirror, "compared") == 2
    asyncio.run(scenario())


def test_without_a_shadow_application_copies_are_unavailable_and_it_is_looked_for_again_later() -> None:
    now = [0.0]
    attempts: list[float] = []

    async def connect() -> ShadowCall:
        attempts.append(now[0])
        if len(attempts) == 1:
            raise RuntimeError("Application 'keel-shadow' does not exist.")
        return answering(["no", "yes", "no"])

    async def scenario() -> ShadowMirror:
        mirror = ShadowMirror(connect, ShadowConfig(), ShadowMetrics(CollectorRegistry(), "m", "1"), retry_s=5,
                              clock=lambda: now[0])
        mirror.submit(FRAME, CHAMPION)
        await settled(mirror)
        now[0] = 4.0
        mirror.submit(FRAME, CHAMPION)  # within retry_s: counted, the controller is not asked again
        await settled(mirror)
        now[0] = 6.0
        mirror.submit(FRAME, CHAMPION)
        await settled(mirror)
        return mirror

    mirror = asyncio.run(scenario())
    assert attempts == [0.0, 6.0]
    assert copies(mirror, "unavailable") == 2 and copies(mirror, "compared") == 1 and rows(mirror, "same") == 3


def test_a_sample_copies_that_share_of_forward_passes() -> None:
    async def scenario() -> ShadowMirror:
        mirror = mirror_over(answering(["no", "yes", "no"]), ShadowConfig(sample=0.25), rng=random.Random(7))
        for _ in range(400):
            mirror.submit(FRAME, CHAMPION)
            await settled(mirror)
        return mirror

    draws = random.Random(7)
    expected = sum(draws.random() < 0.25 for _ in range(400))
    mirror = asyncio.run(scenario())
    assert copies(mirror, "compared") == expected and 70 < expected < 130
    assert rows(mirror, "same") == 3 * expected


def test_a_shadow_must_be_of_the_champions_kind_and_read_only_columns_its_requests_carry() -> None:
    tabular = "tabular classifier"
    check_shadow_fits(tabular, ["size", "colour", "weight"], tabular, ["size", "colour"], "models:/m/1", "models:/m/2")
    with pytest.raises(ConfigError, match=r"models:/m/2 reads column\(s\) \['age'\] that requests to models:/m/1"):
        check_shadow_fits(tabular, ["size"], tabular, ["size", "age"], "models:/m/1", "models:/m/2")
    with pytest.raises(ConfigError, match="models:/shop/3 is a recommender of int user ids and models:/m/1 a tabular"):
        check_shadow_fits(tabular, ["size"], "recommender of int user ids", ["user_id", "k"], "models:/m/1",
                          "models:/shop/3")
    with pytest.raises(ConfigError, match="is a recommender of str user ids and models:/shop/1 a recommender of int"):
        check_shadow_fits("recommender of int user ids", ["user_id", "k"], "recommender of str user ids",
                          ["user_id", "k"], "models:/shop/1", "models:/shop/2")


def applications(shadow_uri: str) -> list[dict]:
    return [{"name": "keel", "args": {"model_uri": "models:/m/1", "config": {"replicas": 2, "shadow": {}}}},
            {"name": "other", "args": {"model_uri": "models:/n/1"}},
            {"name": SHADOW_APP, "route_prefix": None, "args": {"model_uri": shadow_uri, "config": {}}}]


def same_version(versions: dict[str, str]) -> Callable[[str, str], bool]:
    return lambda first, second: versions[first] == versions[second]


def test_a_shadow_serving_the_new_champion_has_graduated_and_goes() -> None:
    versions = {"models:/m@challenger": "2", "models:/m/2": "2", "models:/m/3": "3"}
    kept = without_challengers_serving(applications("models:/m@challenger"), "keel", "models:/m/2",
                                         same_version(versions))
    assert [a["name"] for a in kept] == ["keel", "other"]
    assert kept[0]["args"]["config"] == {"replicas": 2}  # the champion stops copying
    unchanged = applications("models:/m@challenger")
    assert without_challengers_serving(applications("models:/m@challenger"), "keel", "models:/m/3",
                                         same_version(versions)) == unchanged


def test_a_new_shadow_replaces_the_old_one_keeping_its_settings_and_the_champion_starts_copying() -> None:
    alone = [{"name": "keel", "args": {"model_uri": "models:/m/1", "config": {"replicas": 2, "shadow": None}}},
             {"name": "other", "args": {"model_uri": "models:/n/1"}}]
    first = with_shadow(alone, "keel", "models:/m/2")
    assert [a["name"] for a in first] == ["keel", "other", SHADOW_APP]
    assert first[0]["args"]["config"] == {"replicas": 2, "shadow": ShadowConfig().model_dump()}
    assert first[2]["route_prefix"] is None and first[2]["args"] == {"model_uri": "models:/m/2", "config": {}}
    first[2]["args"]["config"] = {"replicas": 3}
    first[0]["args"]["config"]["shadow"] = {"sample": 0.1}
    second = with_shadow(first, "keel", "models:/m/3")
    assert [a["name"] for a in second] == ["keel", "other", SHADOW_APP]
    assert second[2]["args"] == {"model_uri": "models:/m/3", "config": {"replicas": 3}}
    assert second[0]["args"]["config"]["shadow"] == {"sample": 0.1}


def test_the_serve_config_with_a_shadow_is_one_ray_accepts() -> None:
    from ray.serve.schema import ServeDeploySchema

    from keel.serve.control import serve_config_document
    from keel.serve.config import ServeConfig

    document = serve_config_document("models:/m@champion", ServeConfig(replicas=2), "models:/m/5",
                                     ServeConfig(replicas=1, cpus_per_replica=0.5))
    schema = ServeDeploySchema.model_validate(document)
    champion, shadow = schema.applications
    assert champion.route_prefix == "/" and shadow.route_prefix is None and shadow.name == SHADOW_APP
    assert ServeConfig.model_validate(champion.args["config"]).shadow == ShadowConfig()
    assert ServeConfig.model_validate(shadow.args["config"]).cpus_per_replica == 0.5
    (alone,) = serve_config_document("models:/m@champion", ServeConfig())["applications"]
    assert alone["args"]["config"]["shadow"] is None



@pytest.mark.parametrize("preview", ["shadow", "canary"])
def test_with_nothing_serving_the_model_a_version_awaiting_approval_has_no_traffic_to_share(
        preview: str, tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    from keel.config import RegisterConfig
    from keel.serve.control import deploy_awaiting_approval
    from keel.settings import KeelSettings

    registry = RegisterConfig(model_name="m", approval="manual", preview=preview)
    assert deploy_awaiting_approval("models:/m/2", registry, KeelSettings(home=tmp_path / ".keel")) is None
    assert f"no traffic for its {preview}" in caplog.text  # no Ray head here
