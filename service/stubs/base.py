"""What every stub shares: configurable latency, failures and outages, and a record of calls.

Behaviour (latency, failure rate and status, outage, fixed status, capacity) can be changed
while the stub runs, in-process (``stub.behaviour.down = True``) or over HTTP (``POST
/_stub/behaviour`` with a JSON object), so tests that run courier as a separate process can
inject faults too. ``GET /_stub/stats`` returns the call counts. The test kit
(``courier_testkit.stubs``) builds on these classes through ``control_routes`` and
``effect``; it does not copy them. Successful deliveries are counted per ``Idempotency-Key`` (``effects``). A real system that
honours the key applies a repeat once; the stub acknowledges it too, but counts it, so tests
can tell "applied once" (every key present) from "delivered once" (no key counted twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from aiohttp import web

from ..net import bound_port


@dataclass
class Knobs:
    """Fields of a dataclass that may change at run time, by name (a JSON object over HTTP)."""

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a partial update (unknown names are refused)."""
        known = {f.name for f in fields(self)}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(f"unknown behaviour {name!r}")
            setattr(self, name, value)


@dataclass
class Faults(Knobs):
    """Latency and failures to inject (a stub's, or the test kit's AWS proxy's per upstream)."""

    latency_seconds: float = 0.0
    failure_rate: float = 0.0  # this share of calls is answered ``failure_status``
    failure_status: int = 503
    down: bool = False  # every call fails (a stub answers 503, the AWS proxy failure_status)


@dataclass
class Behaviour(Faults):
    """How a stub answers; every field may change at run time."""

    fixed_status: int = 0  # answer every call with this status (0 = behave normally)
    capacity: int = 0  # calls waiting out their latency at once; more get 503 (0 = no limit)


@dataclass(frozen=True, slots=True)
class Call:
    """One request a stub received."""

    path: str
    idempotency_key: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class StubServer:
    """Base of the stubs: subclasses add routes through ``routes`` and use ``gate``."""

    behaviour: Behaviour = field(default_factory=Behaviour)
    calls: list[Call] = field(default_factory=list)
    effects: Counter[str] = field(default_factory=Counter)
    url: str = ""
    in_flight: int = field(default=0, repr=False)  # calls inside ``gate``'s latency now

    def routes(self, app: web.Application) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def application(self) -> web.Application:
        """The aiohttp app: the control routes, then the stub's own (which may catch any path)."""
        app = web.Application()
        self.control_routes(app)
        self.routes(app)
        return app

    def control_routes(self, app: web.Application) -> None:
        """``POST /_stub/behaviour`` and ``GET /_stub/stats``; subclasses may add more."""
        app.router.add_post("/_stub/behaviour", self._set_behaviour)
        app.router.add_get("/_stub/stats", self._stats)

    def record_call(self, request: web.Request, body: bytes) -> None:
        """Keep ``request`` in ``calls`` (every request, answered or refused)."""
        key = request.headers.get("Idempotency-Key", "")
        self.calls.append(Call(request.path, key, dict(request.headers), body, time.monotonic()))

    def effect(self, key: str, body: bytes) -> None:
        """Count a successful delivery of ``body`` under its Idempotency-Key."""
        self.effects[key] += 1

    async def gate(self, request: web.Request) -> tuple[bytes, web.Response | None]:
        """Record the call, wait the latency, and return a failure response when one is due."""
        body = await request.read()
        self.record_call(request, body)
        behaviour = self.behaviour
        if behaviour.capacity and self.in_flight >= behaviour.capacity:
            return body, web.json_response({"error": "over capacity"}, status=503)
        if behaviour.latency_seconds:
            self.in_flight += 1
            try:
                await asyncio.sleep(behaviour.latency_seconds)
            finally:
                self.in_flight -= 1
        if behaviour.down:
            return body, web.json_response({"error": "down"}, status=503)
        if behaviour.fixed_status:
            return body, web.json_response({"error": "configured"}, status=behaviour.fixed_status)
        if behaviour.failure_rate and random.random() < behaviour.failure_rate:
            return body, web.json_response({"error": "injected"}, status=behaviour.failure_status)
        return body, None

    def reset(self) -> None:
        """Forget every call and effect (between benchmark or chaos rounds)."""
        self.calls.clear()
        self.effects.clear()

    def stats(self) -> dict[str, Any]:
        """Call and effect counts."""
        return {
            "calls": len(self.calls),
            "effects": sum(self.effects.values()),
            "duplicate_effects": sum(count - 1 for count in self.effects.values() if count > 1),
            "keys": len(self.effects),
        }

    async def _set_behaviour(self, request: web.Request) -> web.Response:
        try:
            self.behaviour.update(await request.json())
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(asdict(self.behaviour))

    async def _stats(self, _: web.Request) -> web.Response:
        return web.json_response(self.stats())

    @contextlib.asynccontextmanager
    async def serving(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        """Serve on ``host:port`` (0 = any free port); yields the base URL."""
        runner = web.AppRunner(self.application(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self.url = f"http://{host}:{bound_port(site)}"
        try:
            yield self.url
        finally:
            await runner.cleanup()
