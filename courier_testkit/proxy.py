"""The counting, strict-limits reverse proxy in front of the AWS stand-ins, and its client.

``python -m courier_testkit.proxy --upstream sqs=http://127.0.0.1:9324 --upstream kms=...``
listens on 127.0.0.1 (one kernel-chosen port per upstream), forwards every request unchanged
and counts it by AWS operation (``X-Amz-Target`` for the JSON protocols, ``Action`` for the
query protocol). It prints ``proxy listening {"sqs": url, ...}``.

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

In a caller: ``counting_proxy(upstreams)`` starts the process and yields a ``CountingProxy``
(its client); ``counter_delta`` subtracts two ``counts()`` snapshots.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import parse_qs

import aiohttp
from aiohttp import web

from service.stubs.base import Faults

from .ports import LOOPBACK, bound_port
from .processes import ManagedProcess, managed, python_env, wait_for_stop_signal, wait_http
from .sampling import ProcessSampler
from .strict import ActionRecorder, inspect, record, record_messages

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


# Fault injection of one upstream (``down``: every request is answered ``failure_status``).
UpstreamBehaviour = Faults


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
    """Forwards to ``upstreams`` and counts (the server side, in the proxy process)."""

    def __init__(self, upstreams: dict[str, str], *, lenient: bool = False) -> None:
        self.upstreams = upstreams
        self.enforce = not lenient
        self.recorder = ActionRecorder()
        self.counts: dict[str, Counter[str]] = {name: Counter() for name in upstreams}
        self.behaviour = {name: UpstreamBehaviour() for name in upstreams}
        self.session: aiohttp.ClientSession | None = None

    def application(self, name: str) -> web.Application:
        """The app of upstream ``name``: control routes, then everything forwarded."""
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_get("/_proxy/stats", self._stats)
        app.router.add_post("/_proxy/reset", self._reset)
        app.router.add_post("/_proxy/ledger", self._ledger)
        app.router.add_post("/_proxy/behaviour/{name}", self._set_behaviour)

        async def forward(request: web.Request) -> web.StreamResponse:
            return await self._forward(name, request)

        app.router.add_route("*", "/{tail:.*}", forward)
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
    document = {
        "__type": f"com.amazonaws.bench#{kind}",
        "message": "injected by the counting proxy",
    }
    return web.Response(
        status=status,
        body=json.dumps(document),
        headers={
            "Content-Type": "application/x-amz-json-1.0",
            "x-amzn-query-error": f"{kind};Receiver",
        },
    )


@contextlib.asynccontextmanager
async def listening(proxy: Proxy) -> AsyncIterator[dict[str, str]]:
    """``proxy`` served in this event loop, one 127.0.0.1 port per upstream: yields
    {upstream name: URL}. Tests use it directly, to count and fault requests in their own loop."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    ) as session:
        proxy.session = session
        runners: list[web.AppRunner] = []
        urls: dict[str, str] = {}
        try:
            for name in proxy.upstreams:
                runner = web.AppRunner(proxy.application(name), access_log=None)
                await runner.setup()
                runners.append(runner)
                site = web.TCPSite(runner, LOOPBACK, 0)
                await site.start()
                urls[name] = f"http://{LOOPBACK}:{bound_port(site)}"
            yield urls
        finally:
            for runner in runners:
                await runner.cleanup()


async def serve(upstreams: dict[str, str], *, lenient: bool = False) -> None:
    """Serve one port per upstream until SIGTERM or SIGINT (the proxy process's body)."""
    async with listening(Proxy(upstreams, lenient=lenient)) as urls:
        print("proxy listening " + json.dumps(urls), flush=True)
        await wait_for_stop_signal()


def main() -> None:
    """``python -m courier_testkit.proxy --upstream NAME=URL ... [--lenient]``."""
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


# -- the client -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CountingProxy(ProcessSampler):
    """The proxy process (``counting_proxy``): ``urls[name]`` forwards to upstream ``name``."""

    urls: Mapping[str, str]
    process: ManagedProcess

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        any_url = next(iter(self.urls.values()))
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.request(method, any_url + path, json=body) as response,
        ):
            return await response.json()

    async def counts(self) -> dict[str, dict[str, int]]:
        """Requests forwarded so far: {upstream name: {operation: count}}."""
        result: dict[str, Any] = await self._call("GET", "/_proxy/stats")
        result.pop("_calls", None)
        return result

    async def calls(self) -> dict[str, Any]:
        """AWS calls per access key and the strict layer's refusals (``ActionRecorder.as_json``)."""
        result: dict[str, Any] = (await self._call("GET", "/_proxy/stats"))["_calls"]
        return result

    async def reset(self) -> None:
        """Zero every counter."""
        await self._call("POST", "/_proxy/reset")

    async def ledger(self, on: bool) -> None:
        """Start (``on``) or stop the message ledger (``"messages"`` in ``calls()``)."""
        await self._call("POST", "/_proxy/ledger", {"on": on})

    async def set_behaviour(self, name: str, **changes: Any) -> dict[str, Any]:
        """Fault injection for one upstream: latency_seconds, failure_rate, failure_status, down."""
        result: dict[str, Any] = await self._call("POST", f"/_proxy/behaviour/{name}", changes)
        return result


@contextlib.asynccontextmanager
async def counting_proxy(
    upstreams: Mapping[str, str], *, lenient: bool = False
) -> AsyncIterator[CountingProxy]:
    """One listener on 127.0.0.1 per upstream (name -> URL), all in one process.

    It enforces AWS's limits (``courier_testkit.strict``) unless ``lenient``.
    """
    argv = [sys.executable, "-m", "courier_testkit.proxy", *(["--lenient"] if lenient else [])]
    for name, url in upstreams.items():
        argv += ["--upstream", f"{name}={url}"]
    async with managed(argv, name="proxy", env=python_env()) as process:
        found = await process.wait_for_output(r"proxy listening (\{.*\})")
        urls = json.loads(found[1])
        for url in urls.values():
            await wait_http(url + "/_proxy/stats", process=process)
        yield CountingProxy(urls, process)


def counter_delta(
    after: Mapping[str, Mapping[str, int]], before: Mapping[str, Mapping[str, int]]
) -> dict[str, dict[str, int]]:
    """``after - before`` of two ``CountingProxy.counts()`` snapshots."""
    return {
        name: {
            op: count - before.get(name, {}).get(op, 0)
            for op, count in ops.items()
            if count - before.get(name, {}).get(op, 0)
        }
        for name, ops in after.items()
    }


if __name__ == "__main__":
    main()
