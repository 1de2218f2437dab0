"""1. crash: SIGKILL of worker processes under load, twice, each restarted at once.

N requests go through one API process while two worker processes take the messages; each
worker is killed in turn mid-load. Every accepted request must still arrive exactly once in
effect: the killed worker's in-flight messages return after the visibility timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter

from chaos import verify
from chaos.load import Load
from chaos.report import Row
from chaos.rig import Rig
from chaos.scenarios.common import Fleet, Scale, Scenario, fleet, metric, run_id, summarize

KILLS_AT = (0.3, 0.6)  # fractions of the load's duration


class Crash(Scenario):
    """Two workers, each SIGKILLed and restarted once while one API process takes the load."""

    workers: Fleet
    requests: Load
    in_flight_at_kill: list[float]
    restarted_at: float
    states: Counter[str]

    async def setup(self) -> None:
        rig, scale = self.rig, self.scale
        self.row = Row("1 crash (SIGKILL x2)")
        self.resources = await rig.fresh("crash")
        await rig.stubs.reset()
        await rig.stubs.behave("crm", latency_seconds=0.05)  # work in flight when a kill lands
        api = rig.settings(self.resources, "api")
        worker = rig.settings(
            self.resources,
            "worker",
            worker={"visibility_timeout_seconds": scale.visibility, "wait_seconds": 2},
        )
        self.requests = Load(
            [""], rig.token(), run=run_id(), rate=scale.crash_rate, count=scale.crash_requests
        )
        apis = await self.stack.enter_async_context(fleet(rig, api, "crash-api"))
        self.workers = await self.stack.enter_async_context(fleet(rig, worker, "crash-worker", 2))
        self.requests.urls = [apis.alive()[0].url]

    async def load(self) -> None:
        self.sending = asyncio.create_task(self.requests.run_all())

    async def fault(self) -> None:
        """Kill worker 0 at 30% of the load, worker 1 at 60%; restart each at once."""
        duration = self.scale.crash_requests / self.scale.crash_rate
        self.in_flight_at_kill = []
        previous = 0.0
        for index, when in enumerate(KILLS_AT):
            await asyncio.sleep(duration * (when - previous))
            previous = when
            victim = self.workers.processes[index]
            assert victim is not None
            with contextlib.suppress(Exception):
                self.in_flight_at_kill.append(await metric(victim, "courier_messages_in_flight"))
            await self.workers.kill(index)
            await self.workers.start(index)
            self.restarted_at = time.monotonic()

    async def recover(self) -> None:
        """Nothing to undo (the restarts were part of the fault): wait for every delivery."""
        await self.wait_delivered(self.scale.drain_timeout + self.scale.visibility)
        self.states = await verify.statuses(self.rig, self.resources)

    async def check(self) -> list[Row]:
        row, states = self.row, self.states
        summarize(row, self.result, self.drained, dlq=self.dlq)
        row.base_invariants()
        row.recover_s = self.drained.at - self.restarted_at
        row.notes.update(
            in_flight_at_kill=self.in_flight_at_kill,
            statuses=dict(states),
            recover="last restart -> every accepted request delivered (in-flight messages of a "
            f"killed worker return after the visibility timeout, {self.scale.visibility}s)",
        )
        row.check(states.get("completed", 0) == len(self.ids), f"status records: {dict(states)}")
        row.seconds = time.monotonic() - self.started
        return [row]


async def run(rig: Rig, scale: Scale) -> list[Row]:
    """The crash scenario's one row."""
    return await Crash(rig, scale).steps()
