"""5. graceful: SIGTERM to one of two role=all processes sharing a port, under load.

The stopping process must exit 0 within its stop bound, answer every request it read (no 5xx,
no connection left unanswered: the survivor shares the port), and leave no message it received
invisible: each is deleted or made visible again, by message id from the strict proxy's ledger.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
from typing import Any

from chaos import verify
from chaos.load import Load
from chaos.report import Row
from chaos.rig import TARGETS, Rig
from chaos.scenarios.common import Scale, Scenario, fleet, metric, run_id, summarize
from courier_testkit.courier import CourierProcess
from courier_testkit.ports import free_port, free_port_pair
from service import daemon
from service.settings import Settings

DRAIN_SECONDS = 10.0
# Each process signs with an access key of its own, so the strict proxy's message ledger
# tells which messages the victim received, deleted and released.
VICTIM_KEY = "chaos-graceful-victim"
SURVIVOR_KEY = "chaos-graceful-survivor"


class Graceful(Scenario):
    """Two role=all processes on one port; the first (the victim) gets SIGTERM half-way."""

    settings: Settings
    requests: Load
    after_term: dict[str, int]  # API answers after SIGTERM
    term_at: float
    victim: CourierProcess
    victim_metrics: str  # the victim's own /metrics (the shared port reaches either process)
    in_flight: float
    served_rate: float
    exit_seconds: float
    exit_code: int | None
    held: verify.Holdings
    released_at_stop: int | None

    async def setup(self) -> None:
        rig, scale = self.rig, self.scale
        self.row = Row("5 graceful SIGTERM")
        self.resources = await rig.fresh("graceful")
        await rig.stubs.reset()
        for name, _ in TARGETS:
            await rig.stubs.behave(name, latency_seconds=scale.graceful_latency)
        port = free_port()
        self.settings = rig.settings(
            self.resources,
            "all",
            http={"port": port, "drain_seconds": DRAIN_SECONDS, "reuse_port": True},
            worker={
                "wait_seconds": 2,
                "max_in_flight": 200,
                "visibility_timeout_seconds": scale.visibility,
            },
            # Every message in flight is at the targets, not queued on a per-target semaphore
            # (default 32: at 1.6 s a call that is 20 msg/s per target and process).
            target={"concurrency": 128},
        )
        count = int(scale.graceful_rate * scale.graceful_seconds)
        url = f"http://127.0.0.1:{port}"
        self.requests = Load(
            [url], rig.token(), run=run_id(), rate=scale.graceful_rate, count=count
        )
        self.after_term = {}
        self.term_at = 0.0
        self.requests.on_answer = self._on_answer
        # Each process also serves /metrics on a port of its own (http.metrics_port + instance):
        # the shared API port reaches either of them.
        metrics_port = free_port_pair()
        http = dataclasses.replace(self.settings.http, metrics_port=metrics_port)
        first = self.settings.replace(http=http)
        second = first.replace(instance=1)
        await self.stack.enter_async_context(verify.message_ledger(rig))
        victim = fleet(rig, first, "graceful-a", env={"AWS_ACCESS_KEY_ID": VICTIM_KEY})
        self.victim = (await self.stack.enter_async_context(victim)).alive()[0]
        survivor = fleet(rig, second, "graceful-b", env={"AWS_ACCESS_KEY_ID": SURVIVOR_KEY})
        await self.stack.enter_async_context(survivor)
        self.victim_metrics = f"http://127.0.0.1:{metrics_port}"

    async def load(self) -> None:
        self.sending = asyncio.create_task(self.requests.run_all())

    async def fault(self) -> None:
        """Half-way through the load, SIGTERM to the victim; wait for it to exit."""
        victim, url = self.victim, self.victim_metrics
        await asyncio.sleep(self.scale.graceful_seconds / 2)
        self.in_flight = await metric(victim, "courier_messages_in_flight", url=url)
        self.served_rate = await _rate(victim, "courier_http_requests_total", 1.0, url)
        self.term_at = time.monotonic()
        victim.process.signal(signal.SIGTERM)
        while victim.process.alive() and time.monotonic() - self.term_at < DRAIN_SECONDS * 3:
            await asyncio.sleep(0.02)
        self.exit_seconds = time.monotonic() - self.term_at
        self.exit_code = victim.process.popen.returncode
        events = await verify.message_events(self.rig)
        self.held = verify.holdings(events, VICTIM_KEY, self.term_at)

    async def recover(self) -> None:
        """Nothing restarts the victim: the survivor takes the rest of the load."""
        await self.wait_delivered(self.scale.drain_timeout)
        self.released_at_stop = _released_at_stop(self.victim.process.stderr())

    async def check(self) -> list[Row]:
        row, result, exit_seconds = self.row, self.result, self.exit_seconds
        summarize(row, result, self.drained, dlq=self.dlq)
        row.base_invariants()
        row.recover_s = exit_seconds
        server_errors = sum(n for a, n in self.after_term.items() if a.isdigit() and int(a) >= 500)
        client_errors = result.client_errors()
        stop_bound = daemon.stop_bound_seconds(self.settings)
        row.notes.update(
            in_flight_at_sigterm=self.in_flight,
            victim_http_rate=round(self.served_rate, 1),
            exit_seconds=round(exit_seconds, 2),
            exit_code=self.exit_code,
            drain_bound=DRAIN_SECONDS,
            released_at_stop=self.released_at_stop,
            stop_bound=stop_bound,
            answers_after_sigterm=self.after_term,
            client_errors=dict(client_errors),
            recover="SIGTERM -> process exited",
        )
        row.check(self.exit_code == 0, f"exit code {self.exit_code}")
        # The drain (both halves, one deadline), then releasing and flushing, then the exit.
        row.check(
            exit_seconds <= stop_bound,
            f"exited after {exit_seconds:.1f}s, beyond the {stop_bound:g}s stop bound",
        )
        row.check(server_errors == 0, f"{server_errors} 5xx answers after SIGTERM")
        # Every request the victim read was answered, keep-alive connections were told
        # `Connection: close`, and the survivor shares the port: no attempt may go unanswered.
        row.check(
            not client_errors,
            f"{sum(client_errors.values())} client-side errors (no HTTP answer): "
            f"{dict(client_errors)}",
        )
        check_orphans(row, self.held, self.settings.worker.visibility_timeout_seconds)
        row.seconds = time.monotonic() - self.started
        return [row]

    def _on_answer(self, _: Any, answer: str) -> None:
        if self.term_at:
            self.after_term[answer] = self.after_term.get(answer, 0) + 1


def check_orphans(row: Row, held: verify.Holdings, visibility: int) -> None:
    """Every message the stopping process received is deleted or visible again at its exit.

    By message id, from the proxy's ledger read right after the exit: one it received but
    neither finished nor released stays invisible for the visibility timeout (then the
    survivor delivers it: late, not lost).
    """
    row.notes.update(
        victim_received=len(held.received),
        victim_received_before_sigterm=len(held.received_before),
        victim_deleted=len(held.received & held.deleted),
        victim_released=len(held.released),
        orphaned_at_exit=len(held.orphaned),
    )
    row.check(
        bool(held.received_before),
        "the ledger saw no message received by the stopping process before SIGTERM",
    )
    if held.orphaned:
        row.notes["orphaned_sample"] = sorted(held.orphaned)[:5]
    row.check(
        not held.orphaned,
        f"{len(held.orphaned)} of the {len(held.received)} messages received by the stopping "
        f"process were neither deleted nor visible again when it exited: they wait out the "
        f"visibility timeout ({visibility}s)",
    )


def _released_at_stop(log: str) -> int | None:
    """How many unfinished messages the worker released as it stopped (its ``consumer_stopped``
    log line; None without one)."""
    for event in verify.log_events(log, "consumer_stopped"):
        released = event.get("released")
        return int(released) if released is not None else None
    return None


async def _rate(process: CourierProcess, name: str, seconds: float, url: str) -> float:
    before = await metric(process, name, url=url)
    await asyncio.sleep(seconds)
    return (await metric(process, name, url=url) - before) / seconds


async def run(rig: Rig, scale: Scale) -> list[Row]:
    """The graceful-shutdown scenario's one row."""
    return await Graceful(rig, scale).steps()
