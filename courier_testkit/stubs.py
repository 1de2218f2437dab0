"""The stub IdM and legacy systems of tests, bench and chaos, their process and its client.

``StubIdm`` and ``StubTarget`` are ``service.stubs``' ``IdmStub`` and ``LegacyStub`` (the
ones ``courier local`` serves: one route table) plus what a harness asks of them:

- knobs, in-process (``stub.behaviour``) or over HTTP (``POST /_stub/behaviour``):
  ``latency_seconds``, ``failure_rate`` + ``failure_status``, ``down``, ``fixed_status``,
  ``capacity`` (calls in their latency at once), ``queue`` (more calls that wait for a slot;
  beyond it they are answered ``overload_status``, 503 by default), ``retry_after_seconds``
  (> 0: a Retry-After on those refusals and on ``fixed_status`` answers);
- call records: ``stub.calls`` (every request), ``stub.effects`` (successful deliveries per
  Idempotency-Key) and ``stub.recorder`` (``EffectRecorder``: when each key's first effect
  arrived, the request ids per delivered username, refusals by key);
- ``StubTarget.reject_marker``: a delivery whose body contains it is answered 400 (a
  permanent refusal of that request only) and is not an effect.

Control routes on every stub port (besides ``/_stub/behaviour`` and ``GET /_stub/stats``):

- ``GET /_stub/timeline[?since=t]``: every call's [arrival, end, status, waited, path]
  (``StubProcess.timeline``); ``GET /_stub/stats`` also counts the calls refused for capacity
  and the peak of calls open at once (``refused``, ``peak_concurrent``);
- ``GET /_harness/calls``: ``{"calls": [[idempotency key, arrival time], ...]}`` since the
  last reset, the time on the system-wide monotonic clock (CLOCK_MONOTONIC, comparable with
  ``time.monotonic()`` in any process on the machine);
- ``GET /_chaos/effects``: ``{"effects": {key: count}, "first_at": {key: t}, "requests":
  {username: [request id, ...]}, "refused": {key: count}, "calls": n}`` (two request ids for
  one username is a duplicate effect that no idempotency key can absorb);
- ``POST /_harness/reset`` and ``POST /_chaos/reset`` (the same): forget calls, effects,
  recorded effects and (IdM) identities.

The process: ``python -m courier_testkit.stubs --legacy crm=0.02 --legacy billing
--reject crm=MARKER --idm-latency 0`` (the IdM's API key in ``COURIER_STUB_IDM_API_KEY``)
serves a ``StubIdm`` as ``idm`` and a ``StubTarget`` per ``--legacy NAME[=LATENCY]`` on
127.0.0.1, one port each, and prints ``stubs listening {"idm": url, ...}``. In a caller,
``stub_process(...)`` starts it and yields a ``StubProcess``, its client.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from service.stubs import IdmStub, LegacyStub, StubServer
from service.stubs.base import TimelineEntry

from .processes import (
    HarnessError,
    ManagedProcess,
    managed,
    python_env,
    wait_for_stop_signal,
    wait_http,
)
from .sampling import ProcessSampler

API_KEY_ENV = "COURIER_STUB_IDM_API_KEY"
_SOAP_USERNAME = re.compile(rb"<Username>([^<]*)</Username>")
# What ``StubProcess.reset`` restores when the process was started with restore_behaviour.
DEFAULT_BEHAVIOUR: dict[str, Any] = {
    "latency_seconds": 0.0,
    "failure_rate": 0.0,
    "down": False,
    "fixed_status": 0,
    "capacity": 0,
    "queue": 0,
    "overload_status": 503,
    "retry_after_seconds": 0.0,
}


def delivered_username(body: bytes) -> str:
    """The username a delivery (SOAP, JSON mailbox or IdM body) is about; "" if none."""
    found = _SOAP_USERNAME.search(body)
    if found:
        return found[1].decode(errors="replace")
    try:
        document = json.loads(body)
    except ValueError:
        return ""
    if isinstance(document, dict):
        mailbox = document.get("mailbox")
        if isinstance(mailbox, dict):
            return str(mailbox.get("username", ""))
        return str(document.get("username", ""))
    return ""


@dataclass
class EffectRecorder:
    """Per effect beyond ``StubServer.effects``: when a key's first effect arrived, the
    request ids each username was delivered under, and the calls refused by key."""

    first_at: dict[str, float] = field(default_factory=dict)
    requests: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    refused: Counter[str] = field(default_factory=Counter)

    def record(self, key: str, body: bytes) -> None:
        """An effect of ``body`` under Idempotency-Key ``key`` (``<request id>:<target>``)."""
        self.first_at.setdefault(key, time.monotonic())
        username = delivered_username(body)
        if username:
            self.requests[username].add(key.split(":", 1)[0])

    def clear(self) -> None:
        """Forget everything recorded."""
        self.first_at.clear()
        self.requests.clear()
        self.refused.clear()

    def as_json(self, stub: StubServer) -> dict[str, Any]:
        """The ``GET /_chaos/effects`` document of ``stub``."""
        return {
            "effects": dict(stub.effects),
            "first_at": self.first_at,
            "requests": {name: sorted(ids) for name, ids in self.requests.items()},
            "refused": dict(self.refused),
            "calls": len(stub.calls),
        }


@dataclass
class RecordingStub(StubServer):
    """A stub that also records effects (``recorder``) and serves the harness routes."""

    recorder: EffectRecorder = field(default_factory=EffectRecorder)

    def effect(self, key: str, body: bytes) -> None:
        """Count the effect and record it."""
        super().effect(key, body)
        self.recorder.record(key, body)

    def reset(self) -> None:
        """Also forget the recorded effects."""
        super().reset()
        self.recorder.clear()

    def control_routes(self, app: web.Application) -> None:
        """The ``/_stub`` routes plus ``/_harness/*`` and ``/_chaos/*``."""
        super().control_routes(app)
        app.router.add_get("/_harness/calls", self._arrivals)
        app.router.add_post("/_harness/reset", self._reset)
        app.router.add_get("/_chaos/effects", self._effects)
        app.router.add_post("/_chaos/reset", self._reset)

    async def _arrivals(self, _: web.Request) -> web.Response:
        return web.json_response(
            {"calls": [[call.idempotency_key, call.at] for call in self.calls]}
        )

    async def _effects(self, _: web.Request) -> web.Response:
        return web.json_response(self.recorder.as_json(self))

    async def _reset(self, _: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"reset": True})


@dataclass
class StubIdm(RecordingStub, IdmStub):
    """The IdM stub with effect records (see the module docstring)."""


@dataclass
class StubTarget(RecordingStub, LegacyStub):
    """A legacy-system stub with effect records; refuses (400) bodies with ``reject_marker``."""

    reject_marker: bytes = b""

    async def _deliver(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.reject_marker and self.reject_marker in body:
            self.record_call(request, body)
            self.recorder.refused[request.headers.get("Idempotency-Key", "")] += 1
            return web.json_response({"error": "refused by the chaos marker"}, status=400)
        return await super()._deliver(request)


# -- the stub process -------------------------------------------------------------------------


async def serve(
    legacy: Mapping[str, float],
    *,
    idm_latency: float = 0.0,
    idm_api_key: str = "",
    reject: Mapping[str, str] | None = None,
) -> None:
    """Serve ``idm`` and the ``legacy`` targets (name -> latency) until SIGTERM or SIGINT."""
    idm = StubIdm(api_key=idm_api_key)
    idm.behaviour.latency_seconds = idm_latency
    stubs: dict[str, StubServer] = {"idm": idm}
    for name, latency in legacy.items():
        marker = (reject or {}).get(name, "")
        stub = StubTarget(name=name, reject_marker=marker.encode())
        stub.behaviour.latency_seconds = latency
        stubs[name] = stub
    async with contextlib.AsyncExitStack() as stack:
        urls = {name: await stack.enter_async_context(s.serving()) for name, s in stubs.items()}
        print("stubs listening " + json.dumps(urls), flush=True)
        await wait_for_stop_signal()


def main() -> None:
    """``python -m courier_testkit.stubs --legacy NAME[=LATENCY] ... [--reject NAME=MARKER]``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--legacy", action="append", default=[], metavar="NAME[=LATENCY]")
    parser.add_argument("--reject", action="append", default=[], metavar="NAME=MARKER")
    parser.add_argument("--idm-latency", type=float, default=0.0)
    args = parser.parse_args()
    legacy = {}
    for item in args.legacy:
        name, _, latency = item.partition("=")
        legacy[name] = float(latency or 0)
    reject = dict(item.partition("=")[::2] for item in args.reject)
    import uvloop

    uvloop.run(
        serve(
            legacy,
            idm_latency=args.idm_latency,
            idm_api_key=os.environ.get(API_KEY_ENV, ""),
            reject=reject,
        )
    )


# -- the client -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StubProcess(ProcessSampler):
    """The stub process (``stub_process``): ``urls[name]``, knobs and call records over HTTP.

    ``restore_behaviour``: ``reset()`` also puts every knob back to its default.
    """

    urls: Mapping[str, str]
    process: ManagedProcess
    restore_behaviour: bool = False

    async def _call(self, name: str, method: str, path: str, body: Any = None) -> Any:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
            session.request(method, self.urls[name] + path, json=body) as response,
        ):
            document = await response.json()
            if response.status >= 300:
                raise HarnessError(f"stub {name} {path}: HTTP {response.status} {document}")
            return document

    async def set_behaviour(self, name: str, **changes: Any) -> dict[str, Any]:
        """Change one stub's knobs (latency_seconds, failure_rate, down, fixed_status...)."""
        result: dict[str, Any] = await self._call(name, "POST", "/_stub/behaviour", changes)
        return result

    behave = set_behaviour  # the name chaos scenarios use

    async def set_all(self, names: Sequence[str] | None = None, **changes: Any) -> None:
        """The same behaviour change on several stubs (default: every stub)."""
        for name in names or list(self.urls):
            await self.set_behaviour(name, **changes)

    async def stats(self, name: str) -> dict[str, Any]:
        """Call and effect counts of one stub."""
        result: dict[str, Any] = await self._call(name, "GET", "/_stub/stats")
        return result

    async def effects(self, name: str) -> dict[str, Any]:
        """One stub's recorded effects (the ``GET /_chaos/effects`` document)."""
        result: dict[str, Any] = await self._call(name, "GET", "/_chaos/effects")
        return result

    async def arrivals(self, name: str) -> list[tuple[str, float]]:
        """(Idempotency-Key, arrival time on the monotonic clock) of every call since reset.

        CLOCK_MONOTONIC is system-wide on Linux, so times compare with ``time.monotonic()``
        in any process on the machine.
        """
        document = await self._call(name, "GET", "/_harness/calls")
        return [(key, float(at)) for key, at in document["calls"]]

    async def timeline(self, name: str, since: float | None = None) -> list[TimelineEntry]:
        """Every call one stub answered (arrival, end, status, waited, path), in end order;
        ``since``: only those that ended after it (a monotonic time, as ``arrivals``)."""
        path = "/_stub/timeline" + ("" if since is None else f"?since={since!r}")
        document = await self._call(name, "GET", path)
        return [TimelineEntry(*entry) for entry in document["timeline"]]

    async def reset(self, names: Sequence[str] | None = None) -> None:
        """Forget recorded calls, effects (and IdM identities) so memory stays bounded."""
        for name in names or list(self.urls):
            await self._call(name, "POST", "/_harness/reset")
            if self.restore_behaviour:
                await self.set_behaviour(name, **DEFAULT_BEHAVIOUR)


@contextlib.asynccontextmanager
async def stub_process(
    legacy: Mapping[str, float],
    *,
    idm_api_key: str = "",
    idm_latency_seconds: float = 0.0,
    reject: Mapping[str, str] | None = None,
    restore_behaviour: bool = False,
    name: str = "stubs",
) -> AsyncIterator[StubProcess]:
    """An IdM stub ``idm`` and the legacy stubs of ``legacy`` (name -> latency in seconds).

    ``reject``: name -> marker (``StubTarget.reject_marker``).
    """
    argv = [
        sys.executable,
        "-m",
        "courier_testkit.stubs",
        "--idm-latency",
        str(idm_latency_seconds),
    ]
    for target, latency in legacy.items():
        argv += ["--legacy", f"{target}={latency}"]
    for target, marker in (reject or {}).items():
        argv += ["--reject", f"{target}={marker}"]
    env = python_env({API_KEY_ENV: idm_api_key})
    async with managed(argv, name=name, env=env) as process:
        found = await process.wait_for_output(r"stubs listening (\{.*\})")
        urls = json.loads(found[1])
        for url in urls.values():
            await wait_http(url + "/_stub/stats", process=process)
        yield StubProcess(urls, process, restore_behaviour)


if __name__ == "__main__":
    main()
