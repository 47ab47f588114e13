"""Canary serving: a challenger answers a share of the live requests, the champion answers the rest.

A shadow shows how a challenger would answer; a canary lets it answer, for a share of the traffic small
enough that a bad version hurts few callers, before it takes all of it. The canary runs as a second Ray
Serve application (:data:`CANARY_APP`, no HTTP route): a whole Keel model server, reached by the champion's
replicas through a Serve handle. Each scoring request (a POST) goes to the canary with probability
``weight``. With an ``x-routing-key`` header (a user or session id, say) the key's hash decides instead, so
one caller keeps meeting the same version. The canary's answer goes back as it is, with its own version in
the body and the ``x-model-version`` header. A 4xx is the canary's answer too.

A canary that errs costs a caller time, never an answer. On a 5xx, an exception, no answer within
``timeout_s``, or no canary application, the champion answers the request, and it counts as ``fell_back``
or ``unavailable`` in ``keel_canary_requests_total``.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Histogram

from keel.errors import ConfigError
from keel.serve.challenger import CANARY_APP, ApplicationLink, described
from keel.serve.config import CanaryConfig

ROUTING_KEY_HEADER = "x-routing-key"
OUTCOMES = ("answered", "rejected", "fell_back", "unavailable")


@dataclass(frozen=True)
class ForwardedRequest:
    """A scoring request as the champion received it, for the canary's own app to answer."""

    method: str
    path: str  # with the query string, if any
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(frozen=True)
class CanaryAnswer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


CanaryCall = Callable[[ForwardedRequest], Awaitable[CanaryAnswer]]


class CanaryMetrics:
    """The requests the champion's replica sent to the canary, on the champion's ``/metrics``."""

    def __init__(self, registry: CollectorRegistry, model: str, version: str) -> None:
        self.registry = registry
        self._labels = {"model": model, "version": version}
        self.requests = Counter("keel_canary_requests_total",
                                "Scoring requests routed to the canary, by outcome: answered (2xx), rejected (the "
                                "canary's 4xx), fell_back (5xx, error or timeout: the champion answered), "
                                "unavailable (no canary app: the champion answered).",
                                ["model", "version", "outcome"], registry=registry)
        self.latency = Histogram("keel_canary_duration_seconds", "Time from routing a request to the canary's "
                                 "answer.", ["model", "version"], registry=registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        for outcome in OUTCOMES:  # rate() works from the first scrape
            self.requests.labels(**self._labels, outcome=outcome)

    def observe(self, outcome: str, seconds: float | None = None) -> None:
        self.requests.labels(**self._labels, outcome=outcome).inc()
        if seconds is not None:
            self.latency.labels(**self._labels).observe(seconds)


class CanaryRouter:
    """Chooses the requests the canary answers and gets its answers; None means the champion answers."""

    def __init__(self, connect: Callable[[], Awaitable[CanaryCall]], config: CanaryConfig, metrics: CanaryMetrics,
                 retry_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.config, self.metrics = config, metrics
        self.link = ApplicationLink(CANARY_APP, connect, retry_s, clock)
        self._rng = rng or random.Random()

    def chosen(self, routing_key: str | None) -> bool:
        """Whether the canary answers this request: the key's hash when there is one, else a random draw."""
        if routing_key:
            digest = hashlib.sha256(routing_key.encode()).digest()
            return int.from_bytes(digest[:8], "big") / 2**64 < self.config.weight
        return self._rng.random() < self.config.weight

    async def divert(self, request: Request) -> Response | None:
        """The canary's answer when ``request`` is routed to it and it answers; None: the champion answers.
        (The champion's app calls this for each POST: :data:`keel.serve.app.Divert`.)"""
        if not self.chosen(request.headers.get(ROUTING_KEY_HEADER)):
            return None
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = [(k, v) for k, v in request.headers.items() if k != "x-request-id"]
        headers.append(("x-request-id", request.state.request_id))  # one id in both servers' logs
        answer = await self.answer(ForwardedRequest(request.method, target, headers, await request.body()))
        return None if answer is None else Response(answer.body, answer.status, headers=dict(answer.headers))

    async def answer(self, request: ForwardedRequest) -> CanaryAnswer | None:
        """The canary's answer to ``request``, or None when it failed or is missing (the champion answers)."""
        call = await self.link.call()
        if call is None:
            self.metrics.observe("unavailable")
            return None
        started = self.link.clock()
        try:
            answer = await asyncio.wait_for(call(request), self.config.timeout_s)
        except Exception as e:  # noqa: BLE001 - whatever the canary does, the caller gets an answer
            self.metrics.observe("fell_back")
            self.link.warn(f"the canary failed a request; the champion answered: {described(e, self.config.timeout_s)}")
            return None
        if answer.status >= 500:
            self.metrics.observe("fell_back")
            self.link.warn(f"the canary answered HTTP {answer.status}; the champion answered instead")
            return None
        self.metrics.observe("rejected" if answer.status >= 400 else "answered", self.link.clock() - started)
        return answer


def check_canary_fits(champion_kind: str, champion_columns: list[str], canary_kind: str, canary_columns: list[str],
                      champion_uri: str, canary_uri: str) -> None:
    """Refuse a canary that would reject the champion's requests: a ConfigError saying why.

    The canary reads the requests sent to the champion as they are, so it must be the same kind of model
    and, for a tabular one, take exactly the same columns (a request with a column more or less is a 422).
    """
    if champion_kind != canary_kind:
        raise ConfigError(f"{canary_uri} is a {canary_kind} and {champion_uri} a {champion_kind}: a canary answers "
                          "the champion's requests, so it must be the same kind of model.")
    missing = sorted(set(canary_columns) - set(champion_columns))
    extra = sorted(set(champion_columns) - set(canary_columns))
    if missing or extra:
        differences = "; ".join(part for part in (f"it needs {missing}, which they lack" if missing else "",
                                                  f"they carry {extra}, which it refuses" if extra else "") if part)
        raise ConfigError(f"{canary_uri} would answer 422 to every request {champion_uri} takes: {differences}. "
                          "A canary needs the champion's input columns; shadow it instead (`--shadow`).")


async def answer_in_process(app: Callable[..., Awaitable[None]], request: ForwardedRequest) -> CanaryAnswer:
    """``request`` answered by an ASGI app in this process: the canary replica's own Keel app, so a forwarded
    request meets the same validation, limits and errors as one sent to the canary over HTTP."""
    path, _, query = request.path.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
             "root_path": "", "client": ("127.0.0.1", 0), "server": ("canary", 80),
             "headers": [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in request.headers]}
    body_sent, finished = False, asyncio.Event()
    status, headers, chunks = 500, [], []

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await finished.wait()  # the caller "disconnects" only once the answer is complete
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                finished.set()

    await app(scope, receive, send)
    return CanaryAnswer(status, headers, b"".join(chunks))
