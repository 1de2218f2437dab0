"""What every stub shares: configurable latency, failures and outages, and a record of calls.

Behaviour (latency, failure rate and status, outage, fixed status, capacity and queue) can be
changed while the stub runs, in-process (``stub.behaviour.down = True``) or over HTTP (``POST
/_stub/behaviour`` with a JSON object), so tests that run courier as a separate process can
inject faults too. ``GET /_stub/stats`` returns the call counts, ``GET /_stub/timeline`` every
call's arrival, end, status and wait (``TimelineEntry``), ``POST /_stub/reset`` forgets them.

A legacy system with real capacity: ``capacity`` K calls are served at once (each holds its
slot for ``latency_seconds``), up to ``queue`` Q more wait for a slot in arrival order (so the
latency a caller sees rises with the queue), and a call that finds K in service and Q waiting
is refused at once with ``overload_status`` (503, or 429), with ``Retry-After`` when
``retry_after_seconds`` > 0. With ``queue`` 0, ``capacity`` keeps its first meaning: calls
beyond K are refused at once. The test kit
(``courier_testkit.stubs``) builds on these classes through ``control_routes`` and
``effect``; it does not copy them. Successful deliveries are counted per ``Idempotency-Key`` (``effects``). A real system that
honours the key applies a repeat once; the stub acknowledges it too, but counts it, so tests
can tell "applied once" (every key present) from "delivered once" (no key counted twice).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import random
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

from aiohttp import web

from ..net import bound_port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
    capacity: int = 0  # calls waiting out their latency at once (0 = no limit)
    queue: int = 0  # calls beyond ``capacity`` that wait for a slot; more are refused
    overload_status: int = 503  # the answer to a call refused for capacity (503 or 429)
    # > 0: refusals for capacity and ``fixed_status`` answers carry Retry-After (whole seconds,
    # rounded up).
    retry_after_seconds: float = 0.0


class TimelineEntry(NamedTuple):
    """One call as the stub saw it; times on the system-wide monotonic clock (CLOCK_MONOTONIC,
    comparable with ``time.monotonic()`` in any process on the machine)."""

    arrival: float
    end: float  # when the answer was ready
    status: int  # the answer's status (0: none, the handler was cancelled)
    waited: float  # seconds spent in the queue waiting for a slot
    path: str


# Set by ``gate`` on a call that waited in the queue; read by the timeline middleware.
WAITED = web.RequestKey("stub_waited", float)


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
    in_flight: int = field(default=0, repr=False)  # calls holding a slot (in their latency) now
    timeline: list[TimelineEntry] = field(default_factory=list, repr=False)
    refused: int = 0  # calls refused for capacity (``overload_status``) since reset
    peak_concurrent: int = 0  # most calls open at once (served + queued) since reset
    # Calls waiting for a slot, first come first served (``queue`` of them at most).
    _waiters: deque[asyncio.Future[None]] = field(default_factory=deque, repr=False)

    def routes(self, app: web.Application) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def application(self) -> web.Application:
        """The aiohttp app: the control routes, then the stub's own (which may catch any path);
        every call to the stub's own routes goes on the timeline."""

        @web.middleware
        async def on_timeline(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path.startswith("/_"):  # the control routes are not calls
                return await handler(request)
            return await self._timed(request, handler)

        app = web.Application(middlewares=[on_timeline])
        self.control_routes(app)
        self.routes(app)
        return app

    def control_routes(self, app: web.Application) -> None:
        """``POST /_stub/behaviour``, ``GET /_stub/stats``, ``GET /_stub/timeline`` and ``POST
        /_stub/reset``; subclasses may add more."""
        app.router.add_post("/_stub/behaviour", self._set_behaviour)
        app.router.add_get("/_stub/stats", self._stats)
        app.router.add_get("/_stub/timeline", self._timeline)
        app.router.add_post("/_stub/reset", self._reset_stub)

    def record_call(self, request: web.Request, body: bytes) -> None:
        """Keep ``request`` in ``calls`` (every request, answered or refused)."""
        key = request.headers.get("Idempotency-Key", "")
        self.calls.append(Call(request.path, key, dict(request.headers), body, time.monotonic()))

    def effect(self, key: str, body: bytes) -> None:
        """Count a successful delivery of ``body`` under its Idempotency-Key."""
        self.effects[key] += 1

    async def gate(self, request: web.Request) -> tuple[bytes, web.Response | None]:
        """Record the call, take a slot (waiting in the queue for one if need be), wait the
        latency, and return a failure response when one is due."""
        body = await request.read()
        self.record_call(request, body)
        if not await self._admit(request):
            self.refused += 1
            refusal = {"error": "over capacity"}
            return body, self._answer(refusal, self.behaviour.overload_status)
        try:
            latency = self.behaviour.latency_seconds  # read once served: it may have changed
            if latency:
                await asyncio.sleep(latency)
        finally:
            self._release()
        behaviour = self.behaviour
        if behaviour.down:
            return body, web.json_response({"error": "down"}, status=503)
        if behaviour.fixed_status:
            return body, self._answer({"error": "configured"}, behaviour.fixed_status)
        if behaviour.failure_rate and random.random() < behaviour.failure_rate:
            return body, web.json_response({"error": "injected"}, status=behaviour.failure_status)
        return body, None

    async def _admit(self, request: web.Request) -> bool:
        """Take a service slot, after the calls already waiting; False: refused (K in service
        and the queue full)."""
        self._wake()  # the capacity may have grown since the last call ended
        capacity = self.behaviour.capacity
        if not capacity or (self.in_flight < capacity and not self._waiters):
            self.in_flight += 1
            self._note_peak()
            return True
        if len(self._waiters) >= self.behaviour.queue:
            return False
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._note_peak()
        queued = time.monotonic()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # given a slot, then cancelled before it could use it
            elif waiter in self._waiters:  # _wake may already have dropped it (cancelled)
                self._waiters.remove(waiter)
            raise
        finally:
            request[WAITED] = time.monotonic() - queued
        return True

    def _release(self) -> None:
        """A served call is done: its slot goes to the first call waiting, if any."""
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        """Hand free slots to waiting calls, in arrival order."""
        capacity = self.behaviour.capacity
        while self._waiters and (not capacity or self.in_flight < capacity):
            waiter = self._waiters.popleft()
            if waiter.done():  # cancelled: dropped here, so its handler must not remove it
                continue
            self.in_flight += 1  # the slot passes on: the call stays open
            waiter.set_result(None)

    def _note_peak(self) -> None:
        self.peak_concurrent = max(self.peak_concurrent, self.in_flight + len(self._waiters))

    def _answer(self, document: dict[str, str], status: int) -> web.Response:
        """A refusal or configured answer, with Retry-After when the behaviour sets one."""
        headers = {}
        if self.behaviour.retry_after_seconds > 0:
            headers["Retry-After"] = str(math.ceil(self.behaviour.retry_after_seconds))
        return web.json_response(document, status=status, headers=headers)

    async def _timed(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Run ``handler`` and put the call on the timeline, whatever it answered."""
        arrival = time.monotonic()
        status = 0
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            waited = request.get(WAITED, 0.0)
            self.timeline.append(
                TimelineEntry(arrival, time.monotonic(), status, waited, request.path)
            )

    def timeline_since(self, since: float = float("-inf")) -> list[TimelineEntry]:
        """The timeline entries that ended after ``since`` (entries are kept in end order)."""
        start = bisect.bisect_right(self.timeline, since, key=lambda entry: entry.end)
        return self.timeline[start:]

    def reset(self) -> None:
        """Forget every call, effect and timeline entry, and the refused and peak counts
        (between benchmark or chaos rounds)."""
        self.calls.clear()
        self.effects.clear()
        self.timeline.clear()
        self.refused = 0
        self.peak_concurrent = self.in_flight + len(self._waiters)

    def stats(self) -> dict[str, Any]:
        """Call and effect counts; calls refused for capacity, the peak of calls open at once
        (served and queued), and those open now."""
        return {
            "calls": len(self.calls),
            "effects": sum(self.effects.values()),
            "duplicate_effects": sum(count - 1 for count in self.effects.values() if count > 1),
            "keys": len(self.effects),
            "refused": self.refused,
            "peak_concurrent": self.peak_concurrent,
            "in_flight": self.in_flight,
            "waiting": len(self._waiters),
        }

    async def _set_behaviour(self, request: web.Request) -> web.Response:
        try:
            self.behaviour.update(await request.json())
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self._wake()  # a larger capacity serves the queue now, not when a call ends
        return web.json_response(asdict(self.behaviour))

    async def _stats(self, _: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _timeline(self, request: web.Request) -> web.Response:
        """``{"timeline": [[arrival, end, status, waited, path], ...], "now": t}``; ``?since=t``:
        only the calls that ended after ``t``."""
        try:
            since = float(request.query.get("since", "-inf"))
        except ValueError:
            return web.json_response({"error": "since must be a number"}, status=400)
        entries = self.timeline_since(since)
        return web.json_response({"timeline": entries, "now": time.monotonic()})

    async def _reset_stub(self, _: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"reset": True})

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
