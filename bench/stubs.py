"""The stub process of ``bench.harness.stub_process``: IdM and legacy stubs, one port each.

``python -m bench.stubs --legacy crm=0.02 --legacy billing=0.02 --idm-latency 0`` serves
``service.stubs``' IdmStub (as ``idm``) and one LegacyStub per ``--legacy`` on 127.0.0.1, then
prints ``stubs listening {"idm": url, ...}``. Besides the stubs' own control routes
(``POST /_stub/behaviour``, ``GET /_stub/stats``) each port serves:

- ``GET /_harness/calls``: ``{"calls": [[idempotency key, arrival time], ...]}`` since the
  last reset, the time on the system-wide monotonic clock (CLOCK_MONOTONIC);
- ``POST /_harness/reset``: forget recorded calls, effects and (IdM) identities.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
from dataclasses import dataclass

from aiohttp import web

from service.stubs import IdmStub, LegacyStub, StubServer


def _harness_routes(stub: StubServer, app: web.Application) -> None:
    async def calls(_: web.Request) -> web.Response:
        return web.json_response(
            {"calls": [[call.idempotency_key, call.at] for call in stub.calls]}
        )

    async def reset(_: web.Request) -> web.Response:
        stub.reset()
        return web.json_response({"reset": True})

    app.router.add_get("/_harness/calls", calls)
    app.router.add_post("/_harness/reset", reset)


@dataclass
class BenchIdm(IdmStub):
    """IdmStub with the harness routes (added before the stub's own)."""

    def application(self) -> web.Application:
        app = web.Application()
        _harness_routes(self, app)
        app.router.add_post("/_stub/behaviour", self._set_behaviour)
        app.router.add_get("/_stub/stats", self._stats)
        self.routes(app)
        return app


@dataclass
class BenchLegacy(LegacyStub):
    """LegacyStub with the harness routes (before its catch-all ``POST /{tail}``)."""

    def application(self) -> web.Application:
        app = web.Application()
        _harness_routes(self, app)
        app.router.add_post("/_stub/behaviour", self._set_behaviour)
        app.router.add_get("/_stub/stats", self._stats)
        self.routes(app)
        return app


async def serve(legacy: dict[str, float], idm_latency: float, idm_api_key: str) -> None:
    idm = BenchIdm(api_key=idm_api_key)
    idm.behaviour.latency_seconds = idm_latency
    stubs: dict[str, StubServer] = {"idm": idm}
    for name, latency in legacy.items():
        stub = BenchLegacy(name=name)
        stub.behaviour.latency_seconds = latency
        stubs[name] = stub
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
    parser.add_argument("--legacy", action="append", default=[], metavar="NAME=LATENCY")
    parser.add_argument("--idm-latency", type=float, default=0.0)
    args = parser.parse_args()
    legacy = {}
    for item in args.legacy:
        name, _, latency = item.partition("=")
        legacy[name] = float(latency or 0)
    import uvloop

    uvloop.run(serve(legacy, args.idm_latency, os.environ.get("BENCH_IDM_API_KEY", "")))


if __name__ == "__main__":
    main()
