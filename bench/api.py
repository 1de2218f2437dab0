"""API comparison: POST /v1/mailboxes, the full path, against the bare framework.

courier runs ``role = api`` (JWT verify, schema, IdM stub, status write to dynalite, envelope
seal, SQS via the counting proxy in front of fauxqs). Variants:

- ``courier``: default settings (sends coalesced into SendMessageBatch);
- ``courier-nobatch``: ``COURIER_QUEUE_BATCH_SENDS=false``;
- ``stateless``: no secret cache, a data key per message, no decrypt cache: what a function
  that keeps nothing between invocations pays (secrets and data keys from KMS every time);
- ``bare``: an aiohttp handler answering 202 (the framework's ceiling on this machine);
- ``courier-console``: default settings with the operator console on and nobody opening it
  (``bench.console`` only, not one of ``VARIANTS``).

Saturation is wrk (closed loop, one thread, ``connections`` connections); fixed offered rates
are ``bench.loadgen`` (open loop). Cold start: process start -> READY=1 on a fake
NOTIFY_SOCKET, and -> first 202. Idle: a process warmed up, left alone, then asked once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.consumers import CONSOLE_ON_ENV
from courier_testkit.aws import AwsStack
from courier_testkit.courier import CourierProcess, courier_config, courier_process
from courier_testkit.ports import LOOPBACK, free_port
from courier_testkit.processes import HarnessError, ManagedProcess, managed, python_env
from courier_testkit.proxy import counter_delta
from courier_testkit.stubs import StubProcess
from courier_testkit.tokens import mint_token
from service.settings import Settings

WRK_SCRIPT = Path(__file__).parent / "wrk" / "create_mailbox.lua"
VARIANT_ENV: dict[str, dict[str, str]] = {
    "courier": {},
    "courier-nobatch": {"COURIER_QUEUE_BATCH_SENDS": "false"},
    "stateless": {
        "COURIER_SECRETS_CACHE_ENABLED": "false",
        "COURIER_ENVELOPE_DATA_KEY_MAX_MESSAGES": "1",
        "COURIER_ENVELOPE_DECRYPT_CACHE_SIZE": "0",
    },
    "courier-console": CONSOLE_ON_ENV,  # bench.console: not one of VARIANTS
}
VARIANTS = ("courier", "courier-nobatch", "stateless", "bare")
QUIET_POLL_SECONDS = 0.25
QUIET_POLLS = 2  # the served count unchanged this many polls in a row: nothing in flight
QUIET_TIMEOUT_SECONDS = 30.0
LABELS = {
    "stateless-1": "courier API, stateless, 1 connection",
    "courier": "courier API, full path",
    "courier-nobatch": "courier API, batch sends off",
    "stateless": "courier API, stateless (no caches)",
    "bare": "bare aiohttp 202 handler",
}
# Published serverless cold-start figures, as inputs (not measured here).
SERVERLESS_COLD_START = [
    {
        "what": "Python Lambda cold start (no VPC), typical",
        "seconds": "0.2-0.5",
        "source": "AWS Lambda docs, 'Understanding the Lambda execution environment lifecycle' "
        "(init phase), and AWS Compute Blog 'Operating Lambda: Performance optimization' "
        "(2021): cold starts typically under 1 s, a few hundred ms for Python",
    },
    {
        "what": "Lambda in a VPC before Sept 2019 (ENI per cold start)",
        "seconds": "~10",
        "source": "AWS Compute Blog 'Announcing improved VPC networking for AWS Lambda "
        "functions' (2019-09-03): ENI creation had added up to ~10 s to cold starts",
    },
]


@dataclass
class ApiBench:
    """What every API run shares."""

    stack: AwsStack
    stubs: StubProcess
    base: Settings
    seconds: float
    warmup_seconds: float
    connections: int = 64

    def token(self) -> str:
        """A bearer token with both mailbox scopes, valid for the whole run (6 h)."""
        return mint_token(
            self.stack.secrets["courier.jwt.hs256"],
            self.base.auth,
            subject="bench",
            lifetime_seconds=6 * 3600,
        )

    async def settings(self, port: int = 0) -> Settings:
        """Default settings, role api, a fresh queue, the IdM stub; everything else bootstrapped."""
        queue = await self.stack.queue_pair(f"api-{secrets.token_hex(4)}")
        settings = self.stack.resources.apply_to(self.base.replace(aws=self.stack.settings))
        return settings.replace(
            role="api",
            queue=queue,
            idm=dataclasses.replace(settings.idm, url=self.stubs.urls["idm"]),
            http=dataclasses.replace(settings.http, port=port),
        )


def _tag() -> str:
    return secrets.token_hex(4)


WRK_MISSING = "bench: wrk is not on PATH; install it with: sudo apt-get install wrk"


def require_wrk() -> str:
    """The path of ``wrk``; exits with one line naming the install command when it is missing.

    Called before anything starts, so a machine without wrk is told at once rather than by a
    traceback from the API phase after the emulators and the worker phase have run.
    """
    binary = shutil.which("wrk")
    if binary is None:
        raise SystemExit(WRK_MISSING)
    return binary


async def wrk(url: str, seconds: float, connections: int, token: str) -> dict[str, Any]:
    """One wrk run against POST /v1/mailboxes; the parsed WRK_JSON line."""
    binary = require_wrk()
    process = await asyncio.create_subprocess_exec(
        binary, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
        "-s", str(WRK_SCRIPT), url + "/v1/mailboxes",
        env={**os.environ, "BENCH_TOKEN": token, "BENCH_RUN": _tag()},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=seconds + 60)
    text = out.decode(errors="replace")
    line = next((row for row in text.splitlines() if row.startswith("WRK_JSON ")), None)
    if line is None:
        raise HarnessError(f"wrk printed no result: {text[-1000:]} {err.decode()[-1000:]}")
    result: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["ok_rps"] = (result["requests"] - result["status_errors"]) / (
        result["duration_us"] / 1e6
    )
    return result


async def open_loop(url: str, rate: float, seconds: float, token: str) -> dict[str, Any]:
    """``bench.loadgen`` at ``rate`` requests/s for ``seconds``."""
    argv = [
        sys.executable, "-m", "bench.loadgen", "--url", url + "/v1/mailboxes",
        "--rate", f"{rate:.2f}", "--duration", str(seconds), "--token", token, "--run", _tag(),
    ]  # fmt: skip
    async with managed(argv, name="loadgen", env=python_env()) as process:
        deadline = time.monotonic() + seconds + 60
        while process.alive() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        out = process.stdout().strip()
    if not out:
        raise process.describe_failure("printed no result")
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    return result


@contextlib.asynccontextmanager
async def server(bench: ApiBench, variant: str) -> AsyncIterator[tuple[str, Any]]:
    """The server of ``variant``: (URL, process handle with cpu_seconds and metrics or None)."""
    if variant == "bare":
        argv = [sys.executable, "-m", "bench.peers.bare_api"]
        async with managed(argv, name="bare", env=python_env()) as process:
            found = await process.wait_for_output(r"listening (http://127\.0\.0\.1:\d+)")
            yield found[1], process
        return
    settings = await bench.settings()
    try:
        async with courier_process(
            settings, env=VARIANT_ENV[variant], name=f"courier-{variant}"
        ) as courier:
            yield courier.url, courier
    finally:
        await bench.stack.delete_queues(bench.stack.queue_url(settings.queue.url, direct=True))


async def served(url: str, handle: Any) -> tuple[float, float]:
    """(POST /v1/mailboxes answered 2xx, courier_secret_fetches_total) as the server counts them.

    Counted by the server, not by the load generator: wrk stops with up to ``connections``
    requests in flight, which the server still finishes (their CPU is in the window, so they
    must be in the count too). courier counts in ``courier_http_requests_total``; the bare
    peer answers ``GET /_served``.
    """
    if not isinstance(handle, CourierProcess):
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
            session.get(url + "/_served") as response,
        ):
            return float((await response.json())["served"]), 0.0
    requests = fetches = 0.0
    for (name, labels), value in (await handle.metrics()).items():
        label = dict(labels)
        if name == "courier_secret_fetches_total":
            fetches += value
        elif (
            name == "courier_http_requests_total"
            and label.get("method") == "POST"
            and label.get("route") == "/v1/mailboxes"
            and label.get("status", "").startswith("2")
        ):
            requests += value
    return requests, fetches


async def quiet(url: str, handle: Any, timeout: float = QUIET_TIMEOUT_SECONDS) -> float:  # noqa: ASYNC109
    """Wait until the server has finished what it was given (its count stops moving).

    Taken before a window opens and after it closes, so the CPU between two snapshots is the
    CPU of the requests counted between them, whatever the load generator abandoned.
    Returns how long it took (``timeout`` if the count never settled).
    """
    started = time.monotonic()
    last = (await served(url, handle))[0]
    steady = 0
    while time.monotonic() - started < timeout:
        await asyncio.sleep(QUIET_POLL_SECONDS)
        now = (await served(url, handle))[0]
        steady = steady + 1 if now == last else 0
        if steady >= QUIET_POLLS:
            break
        last = now
    return time.monotonic() - started


async def _counters(bench: ApiBench, handle: Any, url: str) -> dict[str, Any]:
    proxy = bench.stack.proxy
    requests, fetches = await served(url, handle)
    servers = {**bench.stack.servers(), "stubs": bench.stubs}
    return {
        "at": time.monotonic(),
        "cpu": handle.cpu_seconds(),
        "proxy": await proxy.counts() if proxy else {},
        "served": requests,
        "secret_fetches": fetches,
        "servers_cpu": {name: s.cpu_seconds() for name, s in servers.items()},
    }


def _per_request(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """Per-request costs between two quiet snapshots, per request the server answered.

    The same formula for every variant, courier and the bare peer: CPU of the server process
    (user + system, /proc) over the window / requests it answered 2xx in the window.
    """
    window = max(1e-6, after["at"] - before["at"])
    delta = counter_delta(after["proxy"], before["proxy"])
    sqs, kms = delta.get("sqs", {}), delta.get("kms", {})
    requests = max(1.0, after["served"] - before["served"])
    return {
        "served": after["served"] - before["served"],
        "server_cpu_s_per_1000": (after["cpu"] - before["cpu"]) * 1000 / requests,
        "server_cpu_share": (after["cpu"] - before["cpu"]) / window,
        "sqs_requests": sqs,
        "sqs_requests_per_request": sum(sqs.values()) / requests,
        "kms_requests": kms,
        "kms_calls_per_1000": sum(kms.values()) * 1000 / requests,
        "secret_fetches": after["secret_fetches"] - before["secret_fetches"],
        "servers_cpu_share": {
            name: (after["servers_cpu"][name] - before["servers_cpu"][name]) / window
            for name in after["servers_cpu"]
        },
    }


async def _alive(url: str) -> bool:
    """Whether the server answers /healthz within 10 s (a blocked event loop does not)."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.get(url + "/healthz") as response,
        ):
            return response.status < 500
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False


async def saturation(
    bench: ApiBench, variant: str, connections: int | None = None
) -> dict[str, Any]:
    """wrk at ``connections`` against a fresh server of ``variant`` (after a warm-up run).

    A server that stops answering (its event loop blocked) is recorded as hung, with a
    py-spy dump of where it is stuck, instead of failing the whole benchmark.
    """
    token = bench.token()
    connections = connections or bench.connections
    async with server(bench, variant) as (url, handle):
        await wrk(url, bench.warmup_seconds, connections, token)
        if not await _alive(url):
            return await _hung(variant, connections, handle)
        await quiet(url, handle)
        before = await _counters(bench, handle, url)
        result = await wrk(url, bench.seconds, connections, token)
        if not await _alive(url):
            return await _hung(variant, connections, handle)
        drained_s = await quiet(url, handle)
        after = await _counters(bench, handle, url)
        peak = handle.memory()["peak_rss"]
    await bench.stubs.reset(["idm"])
    return {
        "variant": variant,
        "connections": connections,
        "rps": result["ok_rps"],
        "p50_ms": result["p50_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
        "errors": {
            k: result[k] for k in ("status_errors", "connect_errors", "read_errors", "timeouts")
        },
        "peak_rss_mb": peak / 2**20,
        "wrk_completed": result["requests"] - result["status_errors"],
        "drained_after_load_s": drained_s,
        **_per_request(before, after),
    }


async def _hung(variant: str, connections: int, handle: Any) -> dict[str, Any]:
    """The record of a server that stopped answering; it is killed (it would not drain)."""
    where = await _dump(handle.pid)
    getattr(handle, "process", handle).signal(signal.SIGKILL)
    return {"variant": variant, "connections": connections, "hung": True, "where": where}


async def _dump(pid: int) -> str:
    """py-spy's stack dump of ``pid`` (the main thread), or why there is none."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        return "py-spy not installed"
    process = await asyncio.create_subprocess_exec(
        str(spy),
        "dump",
        "--pid",
        str(pid),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    text = out.decode(errors="replace")
    return text.split("Thread ", 2)[1][:1500] if "Thread " in text else text[:1500]


async def fixed_rates(
    bench: ApiBench, variant: str, saturation_rps: float, fractions: Sequence[float]
) -> list[dict[str, Any]]:
    """Open-loop load at ``fractions`` of ``saturation_rps`` against one fresh server."""
    token = bench.token()
    results = []
    async with server(bench, variant) as (url, handle):
        await wrk(url, bench.warmup_seconds, 8, token)
        for fraction in fractions:
            rate = max(1.0, fraction * saturation_rps)
            await quiet(url, handle)
            before = await _counters(bench, handle, url)
            result = await open_loop(url, rate, bench.seconds, token)
            await quiet(url, handle)
            after = await _counters(bench, handle, url)
            result.update(variant=variant, fraction=fraction)
            result.update(_per_request(before, after))
            results.append(result)
            await bench.stubs.reset(["idm"])
    return results


async def secret_reads(bench: ApiBench, rate: float, seconds: float) -> dict[str, Any]:
    """Store reads per secret per TTL under steady load, TTL scaled down (refresh ratio kept).

    Defaults are ttl 300 s with refresh-ahead 60 s; here 4 s and 0.8 s, so a run of a few
    TTLs shows how often each secret is read while requests keep coming.
    """
    ttl, ahead = 4.0, 0.8
    env = {
        "COURIER_SECRETS_TTL_SECONDS": str(ttl),
        "COURIER_SECRETS_REFRESH_AHEAD_SECONDS": str(ahead),
    }
    token = bench.token()
    settings = await bench.settings()
    names = 2  # the API's secrets: the JWT key and the IdM API key
    async with courier_process(settings, env=env, name="courier-ttl") as courier:
        before = await _counters(bench, courier, courier.url)
        load = await open_loop(courier.url, rate, seconds, token)
        after = await _counters(bench, courier, courier.url)
    await bench.stubs.reset(["idm"])
    await bench.stack.delete_queues(bench.stack.queue_url(settings.queue.url, direct=True))
    reads = after["secret_fetches"] - before["secret_fetches"]
    return {
        "ttl_seconds": ttl,
        "refresh_ahead_seconds": ahead,
        "seconds": seconds,
        "requests": load["ok"],
        "store_reads": reads,
        "reads_per_secret_per_ttl": reads / names / (seconds / ttl),
    }


# -- cold start -------------------------------------------------------------------------------


async def _first_202(url: str, token: str, started: float, deadline: float) -> tuple[float, float]:
    """Keep POSTing until one is answered 202: (seconds since start, that request's latency)."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    attempt = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while time.monotonic() < deadline:
            attempt += 1
            name = f"c{_tag()}{attempt:x}"
            body = {
                "username": name,
                "display_name": "Cold",
                "plan": "basic",
                "contact_email": f"{name}@example.com",
            }
            sent = time.monotonic()
            try:
                async with session.post(
                    url + "/v1/mailboxes", json=body, headers=headers
                ) as response:
                    await response.read()
                    if response.status == 202:
                        now = time.monotonic()
                        return now - started, now - sent
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            await asyncio.sleep(0.005)
    return float("nan"), float("nan")


async def _ready_datagram(sock: socket.socket, started: float, deadline: float) -> float:
    loop = asyncio.get_running_loop()
    while time.monotonic() < deadline:
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout=0.5)
        except TimeoutError:
            continue
        if b"READY=1" in data.split(b"\n"):
            return time.monotonic() - started
    return float("nan")


async def cold_start(bench: ApiBench) -> dict[str, Any]:
    """Process start -> READY=1 (fake NOTIFY_SOCKET) and -> first 202, for ``courier run``."""
    port = free_port()
    settings = await bench.settings(port=port)
    directory = Path(tempfile.mkdtemp(prefix="bench-cold-"))
    config = courier_config(settings, directory)
    notify = directory / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.setblocking(False)
    argv = [sys.executable, "-m", "service", "--config", str(config), "run"]
    token = bench.token()
    try:
        started = time.monotonic()
        process = ManagedProcess(
            argv,
            name="courier-cold",
            env=python_env({"NOTIFY_SOCKET": str(notify)}),
            directory=directory,
        )
        try:
            deadline = started + 30
            ready, (first, first_latency) = await asyncio.gather(
                _ready_datagram(sock, started, deadline),
                _first_202(f"http://{LOOPBACK}:{port}", token, started, deadline),
            )
        finally:
            await process.stop()
    finally:
        sock.close()
        await bench.stack.delete_queues(bench.stack.queue_url(settings.queue.url, direct=True))
    return {
        "start_to_ready_s": ready,
        "start_to_first_202_s": first,
        "first_request_ms": first_latency * 1000,
    }


async def interpreter_baseline() -> dict[str, float]:
    """What starting Python and importing courier cost, before courier does anything."""

    async def timed(code: str) -> float:
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(sys.executable, "-c", code, env=python_env())
        await process.wait()
        return time.monotonic() - started

    bare = statistics.median([await timed("pass") for _ in range(3)])
    imports = statistics.median(
        [await timed("import service.daemon, service.app") for _ in range(3)]
    )
    return {"python_start_s": bare, "python_start_and_imports_s": imports}


# -- idle -------------------------------------------------------------------------------------


def _busy_fraction(before: list[int], after: list[int]) -> float:
    """Of the CPU time between two /proc/stat 'cpu' lines, the part not idle or iowait."""
    total = sum(after) - sum(before)
    idle = (after[3] + after[4]) - (before[3] + before[4])
    return 1 - idle / total if total > 0 else 0.0


def _cpu_line() -> list[int]:
    with open("/proc/stat") as stat:
        return [int(v) for v in stat.readline().split()[1:]]


async def _until_quiet(busy_below: float = 0.2, limit_seconds: float = 30) -> float:
    """Wait until the machine's cores were under ``busy_below`` busy for a second; the wait."""
    started = time.monotonic()
    while time.monotonic() - started < limit_seconds:
        before = _cpu_line()
        await asyncio.sleep(1)
        if _busy_fraction(before, _cpu_line()) < busy_below:
            break
    return time.monotonic() - started


class IdleProbe:
    """A courier API warmed up, then left alone for ``idle_seconds``, then asked once.

    Started early so the idle time overlaps the other phases; measured at the end, when
    nothing else runs. Requests are sequential on one keep-alive client, as a quiet
    load balancer would send them.
    """

    def __init__(self, bench: ApiBench, idle_seconds: float) -> None:
        self.bench = bench
        self.idle_seconds = idle_seconds
        self._stack = contextlib.AsyncExitStack()
        self._url = ""
        self._settings: Settings | None = None
        self.warm_p50_ms = float("nan")
        self.idle_since = 0.0

    async def _sequential(self, count: int) -> list[float]:
        token = self.bench.token()
        headers = {"Authorization": f"Bearer {token}"}
        latencies = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            for index in range(count):
                name = f"i{_tag()}{index:x}"
                body = {
                    "username": name,
                    "display_name": "Idle",
                    "plan": "basic",
                    "contact_email": f"{name}@example.com",
                }
                sent = time.monotonic()
                async with session.post(
                    self._url + "/v1/mailboxes", json=body, headers=headers
                ) as response:
                    await response.read()
                    if response.status == 202:
                        latencies.append((time.monotonic() - sent) * 1000)
        return latencies

    async def start(self) -> None:
        self._settings = await self.bench.settings()
        courier = await self._stack.enter_async_context(
            courier_process(self._settings, name="courier-idle")
        )
        self._url = courier.url
        warm = await self._sequential(200)
        self.warm_p50_ms = statistics.median(warm[100:]) if len(warm) > 100 else float("nan")
        self.idle_since = time.monotonic()

    async def finish(self) -> dict[str, Any]:
        try:
            wait = self.idle_since + self.idle_seconds - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            # One request is the measure: not while the last phase's processes still exit.
            quiet_after = await _until_quiet()
            idle = time.monotonic() - self.idle_since
            first = await self._sequential(1)
            after = await self._sequential(50)
        finally:
            await self._stack.aclose()
            if self._settings is not None:
                url = self.bench.stack.queue_url(self._settings.queue.url, direct=True)
                await self.bench.stack.delete_queues(url)
        first_ms = first[0] if first else float("nan")
        return {
            "idle_seconds": idle,
            "steady_p50_ms": self.warm_p50_ms,
            "first_after_idle_ms": first_ms,
            "ratio": first_ms / self.warm_p50_ms,
            "next_50_p50_ms": statistics.median(after) if after else float("nan"),
            "waited_for_quiet_s": quiet_after,
        }
