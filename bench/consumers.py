"""How each compared consumer starts: courier (1 and 2 processes) and the peers.

``start(kind, ...)`` is an async context manager yielding a ``Consumer``: its processes (to
pause with SIGSTOP while a queue is loaded, and for CPU and RSS) and, for the ceiling, the
file it writes its deletions to. Every consumer reads the same queue through the counting
proxy and calls the same stubs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from courier_testkit.aws import AwsStack, node_binary
from courier_testkit.courier import CourierProcess, courier_process
from courier_testkit.processes import ManagedProcess, python_env
from service.settings import Settings, TargetFormat, TargetSettings

# The reference operation's three legacy systems, as in tests/chain.py: two JSON, one SOAP.
TARGETS: tuple[tuple[str, TargetFormat], ...] = (
    ("crm", "json"),
    ("billing", "soap"),
    ("directory", "json"),
)
KINDS = ("naive", "sqs-consumer", "courier", "courier-2p", "ceiling")
LABELS = {
    "naive": "naive boto3 loop",
    "sqs-consumer": "bbc/sqs-consumer (Node)",
    "courier": "courier, 1 process",
    "courier-2p": "courier, 2 processes",
    "ceiling": "ceiling: receive+delete only",
}
# The console on, on a free port, and nobody opening it (bench.console; not one of KINDS).
CONSOLE_ON_ENV = {"COURIER_CONSOLE_ENABLED": "true", "COURIER_CONSOLE_PORT": "0"}
CEILING_LOOPS = 4  # courier's default worker.pollers: "the same concurrency"
READY_SETTLE_SECONDS = 0.5


@dataclass
class Consumer:
    """A running consumer: its processes, and where the ceiling writes its deletions."""

    kind: str
    processes: list[Any]  # ManagedProcess or CourierProcess
    out_path: Path | None = None
    couriers: list[CourierProcess] = field(default_factory=list)

    def pause(self) -> None:
        for process in self._managed():
            process.signal(signal.SIGSTOP)

    def resume(self) -> None:
        for process in self._managed():
            process.signal(signal.SIGCONT)

    def cpu_seconds(self) -> float:
        return sum(process.cpu_seconds() for process in self.processes)

    def peak_rss(self) -> list[int]:
        return [process.memory()["peak_rss"] for process in self.processes]

    def _managed(self) -> list[ManagedProcess]:
        return [getattr(p, "process", p) for p in self.processes]

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop() for p in self._managed()))

    def ceiling_deletions(self) -> list[tuple[str, float]]:
        """(request id, deleted at) of every message the ceiling deleted (after ``stop``)."""
        if self.out_path is None or not self.out_path.exists():
            return []
        return [(rid, float(at)) for rid, at in json.loads(self.out_path.read_text())["done"]]


def target_urls(stub_urls: Mapping[str, str]) -> dict[str, str]:
    return {name: f"{stub_urls[name]}/{name}" for name, _ in TARGETS}


def courier_worker_settings(
    base: Settings, aws: Any, resources: Any, queue: Any, stub_urls: Mapping[str, str]
) -> Settings:
    """Default settings, role worker, pointed at the queue, the stubs and the AWS stand-ins."""
    settings = resources.apply_to(base.replace(aws=aws))
    urls = target_urls(stub_urls)
    return settings.replace(
        role="worker",
        queue=queue,
        targets=tuple(TargetSettings(name=n, url=urls[n], format=f) for n, f in TARGETS),
        http=dataclasses.replace(settings.http, port=0, health_port=0),
    )


@contextlib.asynccontextmanager
async def start(
    kind: str,
    *,
    stack: AwsStack,
    stub_urls: Mapping[str, str],
    queue: Any,  # QueueSettings with URLs through the proxy
    base: Settings,
) -> AsyncIterator[Consumer]:
    """Start ``kind`` on ``queue``; yields once it polls (and has had a moment to settle)."""
    async with contextlib.AsyncExitStack() as stack_:
        if kind in ("courier", "courier-2p", "courier-console"):
            settings = courier_worker_settings(
                base, stack.settings, stack.resources, queue, stub_urls
            )
            count = 2 if kind == "courier-2p" else 1
            env = CONSOLE_ON_ENV if kind == "courier-console" else None
            couriers = await asyncio.gather(
                *(
                    stack_.enter_async_context(
                        courier_process(settings, env=env, name=f"courier-worker-{i}")
                    )
                    for i in range(count)
                )
            )
            consumer = Consumer(kind, list(couriers), couriers=list(couriers))
        else:
            consumer = await stack_.enter_async_context(
                _peer(kind, stack.settings.sqs_endpoint_url, queue.url, stub_urls)
            )
        await asyncio.sleep(READY_SETTLE_SECONDS)
        try:
            yield consumer
        finally:
            await consumer.stop()


@contextlib.asynccontextmanager
async def _peer(
    kind: str, endpoint: str, queue_url: str, stub_urls: Mapping[str, str]
) -> AsyncIterator[Consumer]:
    urls = target_urls(stub_urls)
    out_path = None
    env = python_env()
    argv: Sequence[str]
    if kind == "naive":
        argv = [
            sys.executable,
            "-m",
            "bench.peers.naive",
            "--queue-url",
            queue_url,
            "--endpoint",
            endpoint,
        ]
        argv += [item for name, url in urls.items() for item in ("--target", f"{name}={url}")]
    elif kind == "ceiling":
        out_path = Path(tempfile.mkdtemp(prefix="bench-ceiling-")) / "done.json"
        argv = [
            sys.executable, "-m", "bench.peers.ceiling", "--queue-url", queue_url,
            "--endpoint", endpoint, "--loops", str(CEILING_LOOPS), "--out", str(out_path),
        ]  # fmt: skip
    elif kind == "sqs-consumer":
        script = Path(__file__).parent / "peers" / "sqs_consumer.mjs"
        argv = [str(node_binary()), str(script)]
        env.update(
            QUEUE_URL=queue_url,
            SQS_ENDPOINT=endpoint,
            AWS_REGION="us-east-1",
            TARGETS=json.dumps([[name, url] for name, url in urls.items()]),
        )
    else:
        raise ValueError(f"unknown consumer {kind!r}")
    process = ManagedProcess(argv, name=kind, env=env)
    try:
        await process.wait_for_output(r"(?m)^ready$")
        yield Consumer(kind, [process], out_path=out_path)
    finally:
        await process.stop()
