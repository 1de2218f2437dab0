"""What every stub shares: configurable latency, failures and outages, and a record of calls.

Behaviour can be changed while the stub runs, in-process (``stub.behaviour.down = True``) or
over HTTP (``POST /_stub/behaviour`` with a JSON object), so tests that run courier as a
separate process can inject faults too. ``GET /_stub/stats`` returns the call counts.
Successful deliveries are counted per ``Idempotency-Key`` (``effects``). A real system that
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


@dataclass
class Behaviour:
    """How a stub answers; every field may change at run time."""

    latency_seconds: float = 0.0
    failure_rate: float = 0.0
    failure_status: int = 503
    down: bool = False
    fixed_status: int = 0  # answer every call with this status (0 = behave normally)

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a partial update (unknown names are refused)."""
        known = {f.name: f.type for f in fields(self)}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(f"unknown behaviour {name!r}")
            setattr(self, name, value)


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

    def routes(self, app: web.Application) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def application(self) -> web.Application:
        """The aiohttp app: the stub's routes plus the ``/_stub`` control routes."""
        app = web.Application()
        app.router.add_post("/_stub/behaviour", self._set_behaviour)
        app.router.add_get("/_stub/stats", self._stats)
        self.routes(app)
        return app

    async def gate(self, request: web.Request) -> tuple[bytes, web.Response | None]:
        """Record the call, wait the latency, and return a failure response when one is due."""
        body = await request.read()
        key = request.headers.get("Idempotency-Key", "")
        self.calls.append(Call(request.path, key, dict(request.headers), body, time.monotonic()))
        behaviour = self.behaviour
        if behaviour.latency_seconds:
            await asyncio.sleep(behaviour.latency_seconds)
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
        server = site._server
        assert server is not None
        bound = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.url = f"http://{host}:{bound}"
        try:
            yield self.url
        finally:
            await runner.cleanup()
