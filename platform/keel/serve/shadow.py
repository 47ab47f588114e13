"""Shadow serving: a challenger scores a copy of the champion's traffic, and no caller sees its answers.

The gate judges a challenger on a held-out split, but production traffic can
differ from it. In shadow mode the challenger runs as a second Ray Serve
application (:data:`SHADOW_APP`, with no HTTP route). It gets a copy of the
rows of each forward pass the champion makes (one request's rows, or many
batched together), sent once the champion has its answer. The champion's
replica then counts the rows where both models predicted the same class (for
a recommender: the users given the same ranked list, and how many of the
champion's items the shadow also recommends), and records the shadow's
latency and failures. One copy per forward pass, not per
request, keeps the cost of a copy (a call to another process) to one per batch. A shadow that is slow,
down or refuses the rows costs the champion's callers nothing: at most
``max_in_flight`` copies wait at once (more are skipped), each waits at most
``timeout_s``, and no shadow error reaches a response.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pandas as pd
from prometheus_client import CollectorRegistry, Counter, Histogram

from keel.errors import ConfigError
from keel.serve.challenger import SHADOW_APP, ApplicationLink, described
from keel.serve.config import ShadowConfig

SHADOW_DEPLOYMENT = "shadow"
# (the shadow's version, its answer per row: a predicted class, or a recommender's ranked items as a tuple)
ShadowCall = Callable[[pd.DataFrame], Awaitable[tuple[str, list[Any]]]]


class ShadowMetrics:
    """What the champion's replica learns about the shadow, exported on the champion's ``/metrics``."""

    def __init__(self, registry: CollectorRegistry, model: str, version: str) -> None:
        self.registry = registry
        self._labels = {"model": model, "version": version}
        self.copies = Counter("keel_shadow_copies_total",
                              "Copies of a forward pass's rows sent to the shadow, by outcome: compared, failed (an "
                              "error or timeout), skipped (too many copies waiting), unavailable (no shadow app).",
                              ["model", "version", "outcome"], registry=registry)
        self.rows = Counter("keel_shadow_rows_total",
                            "Rows both models scored, by whether the shadow predicted the champion's class (a "
                            "recommender's: the same ranked list).",
                            ["model", "version", "shadow_version", "agreement"], registry=registry)
        self.overlap = Histogram("keel_shadow_top_k_overlap", "Per user a recommender answered: the share of the "
                                 "champion's items the shadow recommends too, in any order.",
                                 ["model", "version", "shadow_version"], registry=registry,
                                 buckets=tuple(i / 10 for i in range(11)))
        self.latency = Histogram("keel_shadow_duration_seconds", "Time from sending a copy to the shadow's answer.",
                                 ["model", "version"], registry=registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        for outcome in ("compared", "failed", "skipped", "unavailable"):  # rate() works from the first scrape
            self.copies.labels(**self._labels, outcome=outcome)

    def observe(self, outcome: str) -> None:
        self.copies.labels(**self._labels, outcome=outcome).inc()

    def observe_comparison(self, shadow_version: str, champion: np.ndarray, shadow: list[Any], seconds: float) -> None:
        same = sum(ours == theirs for ours, theirs in zip(champion, shadow, strict=True))
        for ours, theirs in zip(champion, shadow, strict=True):
            if isinstance(ours, tuple) and ours:  # a recommender's ranked items
                self.overlap.labels(**self._labels, shadow_version=shadow_version).observe(
                    len(set(ours) & set(theirs)) / len(ours))
        self.rows.labels(**self._labels, shadow_version=shadow_version, agreement="same").inc(same)
        self.rows.labels(**self._labels, shadow_version=shadow_version, agreement="different").inc(len(shadow) - same)
        self.latency.labels(**self._labels).observe(seconds)
        self.observe("compared")


class ShadowMirror:
    """Copies scored rows to the shadow, off the response path, and compares its answers.

    ``connect`` returns the call that reaches the shadow, through an :class:`ApplicationLink`: made on the
    first copy, retried at most every ``retry_s`` seconds while there is no shadow (copies count as
    unavailable meanwhile).
    """

    def __init__(self, connect: Callable[[], Awaitable[ShadowCall]], config: ShadowConfig, metrics: ShadowMetrics,
                 retry_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.config, self.metrics = config, metrics
        self.link = ApplicationLink(SHADOW_APP, connect, retry_s, clock)
        self._rng = rng or random.Random()
        self.pending: set[asyncio.Task[None]] = set()

    def submit(self, frame: pd.DataFrame, champion_labels: np.ndarray) -> None:
        """Start comparing the shadow's answer for ``frame`` with the champion's; returns at once, never raises."""
        if self._rng.random() >= self.config.sample:
            return
        if len(self.pending) >= self.config.max_in_flight:
            self.metrics.observe("skipped")
            return
        if self.link.waiting_to_retry:
            self.metrics.observe("unavailable")
            return
        task = asyncio.get_running_loop().create_task(self._compare(frame, champion_labels))
        self.pending.add(task)  # a strong reference until it ends, as asyncio asks
        task.add_done_callback(self.pending.discard)

    async def _compare(self, frame: pd.DataFrame, champion_labels: np.ndarray) -> None:
        call = await self.link.call()
        if call is None:
            self.metrics.observe("unavailable")
            return
        started = self.link.clock()
        try:
            version, labels = await asyncio.wait_for(call(frame), self.config.timeout_s)
            if len(labels) != len(champion_labels):
                raise ValueError(f"the shadow answered {len(labels)} rows for {len(champion_labels)}")
        except Exception as e:  # noqa: BLE001 - whatever the shadow does, the champion keeps serving
            self.metrics.observe("failed")
            self.link.warn(f"a copy sent to the shadow failed: {described(e, self.config.timeout_s)}")
            return
        self.metrics.observe_comparison(version, champion_labels, labels, self.link.clock() - started)


def check_shadow_fits(champion_kind: str, champion_columns: list[str], shadow_kind: str, shadow_columns: list[str],
                      champion_uri: str, shadow_uri: str) -> None:
    """Refuse a shadow that could never score the champion's requests: a ConfigError saying why."""
    if champion_kind != shadow_kind:
        raise ConfigError(f"{shadow_uri} is a {shadow_kind} and {champion_uri} a {champion_kind}: a shadow's "
                          "answers are compared with the champion's, so it must be the same kind of model.")
    missing = sorted(set(shadow_columns) - set(champion_columns))
    if missing:
        raise ConfigError(f"{shadow_uri} reads column(s) {missing} that requests to {champion_uri} do not carry: "
                          "its copies would all fail. Shadow a challenger trained on the champion's columns.")
