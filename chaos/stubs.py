"""The stub process of the chaos runs: an IdM and legacy systems that record every effect.

``python -m chaos.stubs --legacy crm=MARKER --legacy billing --legacy directory``
(the IdM's API key in ``CHAOS_IDM_API_KEY``)
serves ``service.stubs``' IdmStub (as ``idm``) and one LegacyStub per ``--legacy`` on
127.0.0.1 and prints ``stubs listening {"idm": url, ...}``. Each port also serves:

- ``GET /_chaos/effects``: ``{"effects": {key: count}, "first_at": {key: t}, "requests":
  {username: [request id, ...]}}`` -- every successful delivery by Idempotency-Key, when the
  first one arrived (CLOCK_MONOTONIC, comparable across processes) and, per username in the
  delivered body, the request ids it arrived under (two ids for one username is a duplicate
  effect that no idempotency key can absorb), and ``"refused": {key: count}``, every call
  answered 400 for the marker (below) by Idempotency-Key;
- ``POST /_chaos/reset``: forget everything recorded.

A delivery whose body contains its target's marker (``NAME=MARKER``) is answered 400, a
permanent refusal of that request only, and is not an effect. Behaviour (latency, failure rate, outages) is the
stubs' own: ``POST /_stub/behaviour``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from aiohttp import web

from service.stubs import IdmStub, LegacyStub, StubServer
from service.stubs.base import Call

_SOAP_USERNAME = re.compile(rb"<Username>([^<]*)</Username>")


def _username(body: bytes) -> str:
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
class Recorder:
    """What a chaos stub keeps beyond ``StubServer``: first-effect times, ids per username,
    and the calls it refused by key."""

    first_at: dict[str, float] = field(default_factory=dict)
    requests: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    refused: Counter[str] = field(default_factory=Counter)

    def record(self, key: str, body: bytes) -> None:
        self.first_at.setdefault(key, time.monotonic())
        username = _username(body)
        if username:
            self.requests[username].add(key.split(":", 1)[0])

    def routes(self, stub: StubServer, app: web.Application) -> None:
        async def effects(_: web.Request) -> web.Response:
            return web.json_response(
                {
                    "effects": dict(stub.effects),
                    "first_at": self.first_at,
                    "requests": {name: sorted(ids) for name, ids in self.requests.items()},
                    "refused": dict(self.refused),
                    "calls": len(stub.calls),
                }
            )

        async def reset(_: web.Request) -> web.Response:
            stub.reset()
            self.first_at.clear()
            self.requests.clear()
            self.refused.clear()
            return web.json_response({"reset": True})

        app.router.add_get("/_chaos/effects", effects)
        app.router.add_post("/_chaos/reset", reset)


@dataclass
class ChaosIdm(IdmStub):
    """IdmStub that records effects for the chaos runs."""

    recorder: Recorder = field(default_factory=Recorder)

    def application(self) -> web.Application:
        app = super().application()
        self.recorder.routes(self, app)
        return app

    async def _create(self, request: web.Request) -> web.Response:
        response = await super()._create(request)
        if response.status == 201:
            key = request.headers.get("Idempotency-Key", "")
            body = await request.read()
            if key and key not in self.recorder.first_at:
                self.recorder.record(key, body)
        return response


@dataclass
class ChaosLegacy(LegacyStub):
    """LegacyStub that records effects and refuses (400) bodies carrying the reject marker."""

    reject_marker: bytes = b""
    recorder: Recorder = field(default_factory=Recorder)

    def application(self) -> web.Application:
        app = web.Application(client_max_size=1024**2)
        self.recorder.routes(self, app)
        app.router.add_post("/_stub/behaviour", self._set_behaviour)
        app.router.add_get("/_stub/stats", self._stats)
        self.routes(app)
        return app

    async def _deliver(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.reject_marker and self.reject_marker in body:
            self.calls.append(_call(request, body))
            self.recorder.refused[request.headers.get("Idempotency-Key", "")] += 1
            return web.json_response({"error": "refused by the chaos marker"}, status=400)
        response = await super()._deliver(request)
        key = request.headers.get("Idempotency-Key", "")
        if key and 200 <= response.status < 300:
            self.recorder.record(key, body)
        return response


def _call(request: web.Request, body: bytes) -> Call:
    return Call(
        request.path, request.headers.get("Idempotency-Key", ""), {}, body, time.monotonic()
    )


async def serve(legacy: dict[str, str], idm_api_key: str) -> None:
    stubs: dict[str, StubServer] = {"idm": ChaosIdm(api_key=idm_api_key)}
    for name, marker in legacy.items():
        stubs[name] = ChaosLegacy(name=name, reject_marker=marker.encode())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        urls = {name: await stack.enter_async_context(s.serving()) for name, s in stubs.items()}
        print("stubs listening " + json.dumps(urls), flush=True)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--legacy", action="append", default=[], metavar="NAME[=MARKER]")
    args = parser.parse_args()
    legacy = dict(item.partition("=")[::2] for item in args.legacy)
    import uvloop

    uvloop.run(serve(legacy, os.environ.get("CHAOS_IDM_API_KEY", "")))


if __name__ == "__main__":
    main()
