"""The counting reverse proxy of ``bench.harness.counting_proxy``.

``python -m bench.proxy --upstream sqs=http://127.0.0.1:9324 --upstream kms=...`` listens on
127.0.0.1 (one kernel-chosen port per upstream), forwards every request unchanged and counts
it by AWS operation (``X-Amz-Target`` for the JSON protocols, ``Action`` for the query
protocol). It prints ``proxy listening {"sqs": url, ...}``.

It is also the strict layer of bench and chaos (``courier_testkit.strict``): it refuses what
real AWS refuses and fauxqs, dynalite and moto accept (more than 10 message attributes, an SQS
message or batch over 256 KiB, bad batches, visibility timeouts and delays out of range, a
DynamoDB item over 400 KB, ...) with AWS's own error, and records every AWS call per access
key id. ``--lenient`` forwards everything unchanged (it still counts and records).

Control routes, on every port:

- ``GET /_proxy/stats``: ``{upstream: {operation: requests}}``, plus ``"_calls"``: the calls
  recorded per access key and the refusals (``ActionRecorder.as_json()``);
- ``POST /_proxy/reset``: zero the counters and the recorded calls;
- ``POST /_proxy/ledger``: ``{"on": true}`` starts the message ledger (``"messages"`` in
  ``_calls``: every SQS message received, deleted or made visible, by access key and receipt
  handle), ``{"on": false}`` stops it;
- ``POST /_proxy/behaviour/<upstream>``: fault injection for one upstream, a JSON object of
  ``latency_seconds`` (added before forwarding), ``failure_rate`` (0..1) and
  ``failure_status`` (answer with an AWS-shaped error instead of forwarding), ``down`` (every
  request fails with ``failure_status``). Requests are counted whether they fail or not: the
  counts are what clients sent.

One proxy is the uniform way to count requests of clients in any language (boto3,
aiobotocore, the AWS SDK for JavaScript) without touching their code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
from collections import Counter
from dataclasses import asdict, dataclass, fields
from typing import Any
from urllib.parse import parse_qs

import aiohttp
from aiohttp import web

from courier_testkit.strict import ActionRecorder, inspect, record, record_messages

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
ERROR_TYPES = {500: "InternalFailure", 503: "ServiceUnavailable", 400: "ThrottlingException"}


@dataclass
class Behaviour:
    """Fault injection of one upstream."""

    latency_seconds: float = 0.0
    failure_rate: float = 0.0
    failure_status: int = 503
    down: bool = False

    def update(self, changes: dict[str, Any]) -> None:
        known = {f.name for f in fields(self)}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(f"unknown behaviour {name!r}")
            setattr(self, name, value)


def operation(request: web.Request, body: bytes) -> str:
    """The AWS operation a request asks for."""
    target = request.headers.get("X-Amz-Target", "")
    if target:
        return target.rsplit(".", 1)[-1]
    if body and "form-urlencoded" in request.headers.get("Content-Type", ""):
        action = parse_qs(body.decode(errors="replace")).get("Action")
        if action:
            return action[0]
    return request.query.get("Action", f"{request.method} {request.path}")


class Proxy:
    """Forwards to ``upstreams`` and counts."""

    def __init__(self, upstreams: dict[str, str], *, lenient: bool = False) -> None:
        self.upstreams = upstreams
        self.enforce = not lenient
        self.recorder = ActionRecorder()
        self.counts: dict[str, Counter[str]] = {name: Counter() for name in upstreams}
        self.behaviour = {name: Behaviour() for name in upstreams}
        self.session: aiohttp.ClientSession | None = None

    def application(self, name: str) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_get("/_proxy/stats", self._stats)
        app.router.add_post("/_proxy/reset", self._reset)
        app.router.add_post("/_proxy/ledger", self._ledger)
        app.router.add_post("/_proxy/behaviour/{name}", self._set_behaviour)
        app.router.add_route("*", "/{tail:.*}", lambda request: self._forward(name, request))
        return app

    async def _stats(self, _: web.Request) -> web.Response:
        stats: dict[str, Any] = {name: dict(c) for name, c in self.counts.items()}
        stats["_calls"] = self.recorder.as_json()
        return web.json_response(stats)

    async def _reset(self, _: web.Request) -> web.Response:
        for counter in self.counts.values():
            counter.clear()
        self.recorder.clear()
        return web.json_response({"reset": True})

    async def _ledger(self, request: web.Request) -> web.Response:
        self.recorder.ledger = bool((await request.json()).get("on"))
        return web.json_response({"on": self.recorder.ledger})

    async def _set_behaviour(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.behaviour:
            return web.json_response({"error": f"no upstream {name!r}"}, status=404)
        try:
            self.behaviour[name].update(await request.json())
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(asdict(self.behaviour[name]))

    async def _forward(self, name: str, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.counts[name][operation(request, body)] += 1
        behaviour = self.behaviour[name]
        if behaviour.latency_seconds:
            await asyncio.sleep(behaviour.latency_seconds)
        if behaviour.down or (behaviour.failure_rate and random.random() < behaviour.failure_rate):
            return _aws_error(behaviour.failure_status)
        found = inspect(request.headers, body, request.query_string, enforce=self.enforce)
        record(self.recorder, found)
        refused = found.reply()
        if refused is not None:
            status, refusal_headers, payload = refused
            return web.Response(status=status, body=payload, headers=refusal_headers)
        assert self.session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        url = self.upstreams[name] + request.rel_url.raw_path_qs
        async with self.session.request(
            request.method,
            url,
            data=found.forward_body(body),
            headers=headers,
            allow_redirects=False,
        ) as upstream:
            payload = found.merge(upstream.status, await upstream.read())
            record_messages(self.recorder, found, upstream.status, payload)
            reply = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
            return web.Response(status=upstream.status, body=payload, headers=reply)


def _aws_error(status: int) -> web.Response:
    kind = ERROR_TYPES.get(status, "InternalFailure")
    document = {"__type": f"com.amazonaws.bench#{kind}", "message": "injected by bench.proxy"}
    return web.Response(
        status=status,
        body=json.dumps(document),
        headers={
            "Content-Type": "application/x-amz-json-1.0",
            "x-amzn-query-error": f"{kind};Receiver",
        },
    )


async def serve(upstreams: dict[str, str], *, lenient: bool = False) -> None:
    proxy = Proxy(upstreams, lenient=lenient)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    ) as session:
        proxy.session = session
        runners = []
        urls = {}
        for name in upstreams:
            runner = web.AppRunner(proxy.application(name), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            urls[name] = f"http://127.0.0.1:{port}"
            runners.append(runner)
        print("proxy listening " + json.dumps(urls), flush=True)
        await stop.wait()
        for runner in runners:
            await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream", action="append", required=True, metavar="NAME=URL")
    parser.add_argument(
        "--lenient", action="store_true", help="forward what AWS would refuse (no strict limits)"
    )
    args = parser.parse_args()
    upstreams = {}
    for item in args.upstream:
        name, _, url = item.partition("=")
        upstreams[name] = url.rstrip("/")
    import uvloop

    uvloop.run(serve(upstreams, lenient=args.lenient))


if __name__ == "__main__":
    main()
