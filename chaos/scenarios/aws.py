"""4. aws: SQS, then KMS, then DynamoDB unreachable (connection refused) for a window each,
under load through one API process and one worker that stay up for all three phases.

SQS down: the API answers 503 and the client retries. KMS down: secrets are served stale and
the outage must not reach clients. DynamoDB down: the API answers 503, tokens are still
accepted (secrets served stale), and the worker delivers again once it is back.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from chaos import verify
from chaos.load import Load, Request
from chaos.report import Row
from chaos.rig import TARGETS, Rig
from chaos.scenarios.common import Fleet, Scale, Scenario, fleet, metric, run_id, summarize
from chaos.scenarios.planted import preload, sealed_messages
from courier_testkit.tcpproxy import TcpProxy
from service.bootstrap import Resources

DEPENDENCIES = ("sqs", "kms", "dynamodb")


class AwsPhase(Scenario):
    """Load through the API while ``dependency`` is cut; during the cut, messages sealed under a
    data key the worker has never seen are also put straight on the queue (KMS and DynamoDB
    phases), so the worker meets the outage with work of its own."""

    requests: Load
    proxy: TcpProxy
    during: dict[str, int]  # API answers while cut
    planted: list[tuple[str, str, str]]
    stale_before: float
    stale: float
    dlq_before: int
    dlq_count: int
    log_offset: int
    worker_log: str
    cut_at: float
    restored_at: float

    def __init__(
        self, rig: Rig, scale: Scale, resources: Resources, apis: Fleet, workers: Fleet, name: str
    ) -> None:
        super().__init__(rig, scale)
        self.resources = resources
        self.api, self.worker = apis.alive()[0], workers.alive()[0]
        self.dependency = name
        self.lead = 1.0 if scale.name == "small" else 3.0  # load before and after the cut

    async def setup(self) -> None:
        """The processes are already up (shared by the phases): a load, and what to plant."""
        rig, scale = self.rig, self.scale
        self.row = Row(f"4 {self.dependency} unreachable {scale.aws_cut_seconds:g}s")
        await rig.stubs.reset()
        run = run_id()
        self.requests = Load(
            [self.api.url],
            rig.token(),
            run=run,
            rate=scale.aws_rate,
            count=int(scale.aws_rate * (self.lead * 2 + scale.aws_cut_seconds)),
            retry_seconds=scale.aws_cut_seconds + 30,
        )
        self.during = {}
        self.proxy = rig.proxies[self.dependency]

        def on_answer(_: Any, answer: str) -> None:
            if self.proxy.is_cut:
                self.during[answer] = self.during.get(answer, 0) + 1

        self.requests.on_answer = on_answer
        self.planted = []
        if self.dependency != "sqs":
            count = max(10, int(scale.aws_rate * scale.aws_cut_seconds / 2))
            self.planted, _ = await sealed_messages(rig, self.resources, f"p{run}", count, 0)
        self.stale_before = await self._stale()
        self.dlq_before = await verify.dlq_count(rig, self.resources)
        self.log_offset = len(self.worker.process.stderr())

    async def load(self) -> None:
        self.sending = asyncio.create_task(self.requests.run_all())

    async def fault(self) -> None:
        """After ``lead`` seconds of load, cut the dependency for ``aws_cut_seconds``."""
        await asyncio.sleep(self.lead)
        await self.proxy.cut()
        self.cut_at = time.monotonic()
        if self.planted:
            await preload(self.rig, self.resources.queue_url, self.planted)
        await asyncio.sleep(max(0.0, self.scale.aws_cut_seconds - (time.monotonic() - self.cut_at)))

    async def recover(self) -> None:
        await self.proxy.restore()
        self.restored_at = time.monotonic()
        self.result = await self.sending
        self.ids = {r.request_id for r in self.result.accepted} | self._planted_ids()
        self.drained = await verify.wait_delivered(
            self.rig,
            self.resources,
            self.ids,
            timeout=self.scale.drain_timeout + 60,
            settle_seconds=1,
        )
        self.stale = await self._stale() - self.stale_before
        self.dlq_count = await verify.dlq_count(self.rig, self.resources) - self.dlq_before
        self.worker_log = self.worker.process.stderr()[self.log_offset :]

    async def check(self) -> list[Row]:
        row, drained, restored_at = self.row, self.drained, self.restored_at
        summarize(row, self.result, drained, explain=self._explain)
        planted_ids = self._planted_ids()
        planted_delivered = drained.effects.delivered_everywhere(planted_ids)
        row.requests += len(self.planted)
        row.accepted += len(self.planted)
        row.delivered += len(planted_delivered)
        row.lost += len(planted_ids - planted_delivered)
        row.redeliveries = drained.effects.redeliveries(self.ids)
        row.dlq = self.dlq_count
        row.recover_s = (drained.delivered_at or drained.at) - restored_at
        backoffs = [
            float(e["backoff_seconds"])
            for e in verify.log_events(self.worker_log, "receive_failed")
        ]
        after = [
            at
            for t, _ in TARGETS
            for at in drained.effects.by_target[t]["first_at"].values()
            if at > restored_at
        ]
        row.notes.update(
            answers_while_cut=self.during,
            planted_during_cut=len(self.planted),
            stale_secret_lookups=self.stale,
            worker_receive_failures=len(backoffs),
            worker_longest_backoff_s=max(backoffs, default=0.0),
            worker_first_effect_after_restore_s=round(min(after) - restored_at, 2)
            if after
            else None,
            worker_retried=len(verify.log_events(self.worker_log, "delivery_retry")),
            queue_empty_s_after_restore=round(drained.at - restored_at, 1),
            slowest_202_start_vs_cut_and_latency_s=[
                (round(r.final_started - self.cut_at, 2), round(r.latency, 2))
                for r in sorted(self.result.accepted, key=lambda r: -r.latency)[:4]
            ],
            recover="dependency back -> every accepted request delivered",
        )
        self._check_dependency(row)
        row.base_invariants()
        return [row]

    def _check_dependency(self, row: Row) -> None:
        """What an outage of this dependency may and may not show the clients."""
        during = self.during
        if self.dependency == "sqs":
            row.check(during.get("503", 0) > 0, "no 503 while SQS was unreachable")
        if self.dependency == "kms":
            row.check(self.stale > 0, "no stale secret was served while KMS was unreachable")
            row.check(set(during) <= {"202"}, f"the KMS outage reached clients: {during}")
        if self.dependency == "dynamodb":
            row.check(during.get("503", 0) > 0, "no 503 while the status table was unreachable")
            row.check(
                during.get("401", 0) == 0,
                "tokens refused while DynamoDB was down: secrets not served stale",
            )

    def _explain(self, request: Request) -> str | None:
        # The client retries a 503 until well after the restore: a 503 that is its final
        # answer is explained by the cut only if that last attempt started while cut.
        cut = request.status == 503 and self.cut_at <= request.final_started <= self.restored_at
        return f"503 while {self.dependency} was cut" if cut else None

    def _planted_ids(self) -> set[str]:
        return {rid for rid, _, _ in self.planted}

    async def _stale(self) -> float:
        """Secret lookups served stale so far, API and worker together."""
        processes = (self.api, self.worker)
        return sum(
            [await metric(p, "courier_secret_lookups_total", result="stale") for p in processes]
        )


async def run(rig: Rig, scale: Scale) -> list[Row]:
    """One row per dependency; one resource set, API process and worker for all three."""
    started = time.monotonic()
    resources = await rig.fresh("aws")
    secrets = {
        "ttl_seconds": scale.aws_secret_ttl,
        "refresh_ahead_seconds": scale.aws_secret_ttl / 2,
    }
    api = rig.settings(resources, "api", secrets=secrets)
    worker = rig.settings(
        resources,
        "worker",
        secrets=secrets,
        worker={"wait_seconds": 2, "visibility_timeout_seconds": scale.visibility},
    )
    rows: list[Row] = []
    async with fleet(rig, api, "aws-api") as apis, fleet(rig, worker, "aws-worker") as workers:
        for dependency in DEPENDENCIES:
            phase = AwsPhase(rig, scale, resources, apis, workers, dependency)
            rows += await phase.steps()
            rows[-1].seconds = time.monotonic() - phase.started
        dlq = await verify.dlq_messages(rig, resources)
    if dlq:
        rows[-1].notes["dlq_reasons"] = dict(verify.dlq_reasons(dlq))
    rows[0].seconds += time.monotonic() - started - sum(r.seconds for r in rows)
    return rows
