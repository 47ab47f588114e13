"""What a shadow and a canary share: a second Serve application beside the champion's, the champion's
replicas reaching it through a Serve handle, and its lifecycle in the Serve config.

Both challengers are looked up lazily (:class:`ApplicationLink`): the applications deploy together and the
challenger may come up second, or be removed while the champion keeps serving. In the Serve config (what
``keel serve`` PUTs and what a RayService holds) a challenger is an application with no HTTP route, and
the champion's ``config`` carries one setting that turns on copying (``shadow``) or routing (``canary``).
Promoting the challenger's version graduates it: the challenger application and that setting go.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from keel.errors import KeelError

SHADOW_APP = "keel-shadow"
CANARY_APP = "keel-canary"
# a Keel model server: the champion, and the canary too (a shadow has a builder of its own)
SERVER_BUILDER = "keel.serve.deployment:application_builder"
# the champion's ServeConfig field that points its replicas at each challenger application
CHAMPION_SETTING = {SHADOW_APP: "shadow", CANARY_APP: "canary"}
LOG = logging.getLogger(__name__)
Call = TypeVar("Call")


class ApplicationLink(Generic[Call]):
    """The call that reaches a challenger application, made on first use and retried at most every ``retry_s``
    seconds while the application is missing; warnings at most once a minute, so that a broken challenger
    never floods the champion's log."""

    def __init__(self, app: str, connect: Callable[[], Awaitable[Call]], retry_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.app, self._connect, self._retry_s, self.clock = app, connect, retry_s, clock
        self._call: Call | None = None
        self._connect_after = 0.0
        self._warned_at = -float("inf")

    @property
    def waiting_to_retry(self) -> bool:
        """No application at the last lookup, and too soon to look again."""
        return self._call is None and self.clock() < self._connect_after

    async def call(self) -> Call | None:
        """The call, or None when the application cannot be reached (now, or at the last lookup)."""
        if self._call is None and not self.waiting_to_retry:
            try:
                self._call = await self._connect()
            except Exception as e:  # noqa: BLE001 - no such application (yet): try again later
                self._connect_after = self.clock() + self._retry_s
                self.warn(f"the {self.app!r} application cannot be reached: {e}"[:500])
        return self._call

    def warn(self, message: str) -> None:
        if self.clock() - self._warned_at >= 60:
            self._warned_at = self.clock()
            LOG.warning(message)


def described(error: BaseException, timeout_s: float) -> str:
    """The error's type, and Keel's own headline when it has one: never the message of another library's
    error, which can quote the request (a customer's message, say) into the champion's log."""
    if isinstance(error, asyncio.TimeoutError):
        return f"no answer within timeout_s={timeout_s:g} s"
    if not isinstance(error, KeelError):
        return type(error).__name__
    lines = [line for line in error.headline.splitlines() if line.strip()]  # Ray's copy ends with the headline
    return f"{type(error).__name__}: {lines[-1][:300] if lines else ''}"


def challenger_application(app: str, builder: str, model_uri: str, config: dict[str, Any]) -> dict[str, Any]:
    """A challenger's entry in the Serve config: no route, so only the champion's replicas reach it."""
    return {"name": app, "route_prefix": None, "import_path": builder,
            "args": {"model_uri": model_uri, "config": config}}


def with_challenger(applications: list[dict[str, Any]], champion_app: str, challenger: dict[str, Any],
                    champion_setting: dict[str, Any]) -> list[dict[str, Any]]:
    """The applications with ``challenger`` (from :func:`challenger_application`) beside ``champion_app``.

    A challenger of the same kind already there is replaced, but keeps its own serving settings; the
    champion's setting for it keeps its value if it had one, else becomes ``champion_setting``.
    """
    app = challenger["name"]
    existing = next((a for a in applications if a.get("name") == app), None)
    config = dict((existing or {}).get("args", {}).get("config") or {})
    kept = [a for a in applications if a.get("name") != app]
    for application in kept:
        if application.get("name") == champion_app:
            settings = application.setdefault("args", {}).setdefault("config", {})
            settings[CHAMPION_SETTING[app]] = settings.get(CHAMPION_SETTING[app]) or champion_setting
    return [*kept, {**challenger, "args": {**challenger["args"], "config": config or challenger["args"]["config"]}}]


def without_challengers_serving(applications: list[dict[str, Any]], champion_app: str, model_uri: str,
                                  same_version: Callable[[str, str], bool]) -> list[dict[str, Any]]:
    """The applications without a shadow or canary serving ``model_uri``'s version, nor the champion's setting
    for it: one that has graduated (that version is now champion) or been rejected. A challenger of any
    other version stays."""
    graduated = {a.get("name") for a in applications if a.get("name") in CHAMPION_SETTING
                 and (uri := a.get("args", {}).get("model_uri")) and same_version(uri, model_uri)}
    kept = [a for a in applications if a.get("name") not in graduated]
    for application in kept:
        if application.get("name") == champion_app:
            for app in graduated:
                application.get("args", {}).get("config", {}).pop(CHAMPION_SETTING[str(app)], None)
    return kept
