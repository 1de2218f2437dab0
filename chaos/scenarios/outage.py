"""2. outage: a legacy target (billing) failing 20% of calls throughout and down for a window.

The worker retries with backoff, billing's circuit opens during the outage and closes after,
and every accepted request still reaches every target.
"""

from __future__ import annotations

import asyncio
import time

from chaos import verify
from chaos.load import Load
from chaos.report import Row
from chaos.rig import Rig
from chaos.scenarios.common import Scale, Scenario, fleet, metric, run_id, summarize
from courier_testkit.courier import CourierProcess

OPENED = "courier_target_circuit_transitions_total"


class Outage(Scenario):
    """One API process and one worker; billing goes down for ``outage_down_seconds``."""

    requests: Load
    worker: CourierProcess
    opened_before: float
    down_at: float
    up_at: float
    circuit_during: float
    counts: dict[str, float]  # circuit and retry metrics read after the drain

    async def setup(self) -> None:
        rig, scale = self.rig, self.scale
        self.row = Row("2 legacy outage")
        self.resources = await rig.fresh("outage")
        await rig.stubs.reset()
        await rig.stubs.behave("billing", failure_rate=0.2, failure_status=503)
        api = rig.settings(self.resources, "api")
        worker = rig.settings(
            self.resources,
            "worker",
            worker={
                "visibility_timeout_seconds": scale.visibility,
                "backoff_base_seconds": scale.backoff[0],
                "backoff_max_seconds": scale.backoff[1],
            },
            target={"breaker_cooldown_seconds": scale.breaker_cooldown},
        )
        self.requests = Load(
            [""], rig.token(), run=run_id(), rate=scale.outage_rate, count=scale.outage_requests
        )
        apis = await self.stack.enter_async_context(fleet(rig, api, "outage-api"))
        workers = await self.stack.enter_async_context(fleet(rig, worker, "outage-worker"))
        self.requests.urls = [apis.alive()[0].url]
        (self.worker,) = workers.alive()
        self.opened_before = await self._billing(OPENED, state="open")

    async def load(self) -> None:
        self.sending = asyncio.create_task(self.requests.run_all())

    async def fault(self) -> None:
        """After a third of the load time outside the window (0.5 s at least), billing goes down
        for ``outage_down_seconds``; the circuit is read at the end of the window."""
        scale = self.scale
        duration = scale.outage_requests / scale.outage_rate
        await asyncio.sleep(max(0.5, (duration - scale.outage_down_seconds) / 3))
        await self.rig.stubs.behave("billing", down=True)
        self.down_at = time.monotonic()
        await asyncio.sleep(scale.outage_down_seconds)
        self.circuit_during = await self._billing("courier_target_circuit_open")

    async def recover(self) -> None:
        await self.rig.stubs.behave("billing", down=False)
        self.up_at = time.monotonic()
        await self.wait_delivered(self.scale.drain_timeout + 60)
        self.counts = {
            "opened": await self._billing(OPENED, state="open") - self.opened_before,
            "closed": await self._billing(OPENED, state="closed"),
            "open_after": await self._billing("courier_target_circuit_open"),
            "retried": await metric(
                self.worker, "courier_messages_processed_total", outcome="retried"
            ),
        }

    async def check(self) -> list[Row]:
        row, scale, counts = self.row, self.scale, self.counts
        summarize(row, self.result, self.drained, dlq=self.dlq)
        row.base_invariants()
        row.recover_s = self.drained.at - self.up_at
        row.notes.update(
            down_seconds=round(self.up_at - self.down_at, 1),
            circuit_open_during_outage=self.circuit_during,
            circuit_opened=counts["opened"],
            circuit_closed=counts["closed"],
            circuit_open_at_end=counts["open_after"],
            messages_retried=counts["retried"],
            breaker_cooldown_s=scale.breaker_cooldown,
            backoff_base_max_s=list(scale.backoff),
            dlq_reasons=dict(verify.dlq_reasons(self.dlq)),
            recover="billing back up -> every accepted request delivered",
        )
        row.check(counts["opened"] >= 1, "the circuit never opened during the outage")
        row.check(
            counts["closed"] >= 1 and counts["open_after"] == 0,
            "the circuit did not close after the outage",
        )
        row.seconds = time.monotonic() - self.started
        return [row]

    async def _billing(self, name: str, **labels: str) -> float:
        """The worker's metric ``name`` for the billing target."""
        return await metric(self.worker, name, target="billing", **labels)


async def run(rig: Rig, scale: Scale) -> list[Row]:
    """The outage scenario's one row."""
    return await Outage(rig, scale).steps()
