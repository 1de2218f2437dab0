"""Replay and discard from the console: ``courier replay``'s own functions, run as jobs.

A job runs ``service.worker.replay.replay`` (or ``discard``, the same pass deleting instead of
moving) in a task of its own, so a slow replay (``rate`` messages per second) never holds a
request open; its page follows it until it ends. A DLQ copy leaves the DLQ only after the
work queue accepted the replayed message: that is ``replay``'s rule, not this module's. Every
job ends with one ``console_audit`` log line: who, what, the filter, and how many.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

from ..api.auth import Principal
from ..worker.outcomes import Message
from ..worker.replay import ReplayFilter, ReplayReport, discard, replay
from .auth import audit
from .deadletters import DeadLetterReader, DeadLetterView

log = logging.getLogger("courier.console")

Kind = Literal["replay", "discard"]
JOBS_KEPT = 50
LISTED_PER_JOB = 200  # messages a job's page lists (the counts cover them all)
MAX_RATE = 1000.0


@dataclass
class Job:
    """One replay or discard, running or finished."""

    id: str
    kind: Kind
    who: str
    selection: ReplayFilter
    dry_run: bool
    rate: float
    limit: int
    started: float = field(default_factory=time.time)
    state: Literal["running", "done", "failed"] = "running"
    report: ReplayReport = field(default_factory=ReplayReport)
    listed: list[DeadLetterView] = field(default_factory=list)
    error: str = ""
    ended: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def described_filter(self) -> dict[str, object]:
        """The selection as the audit line and the page show it (only the fields set)."""
        fields = asdict(self.selection)
        ids = sorted(fields.pop("message_ids"))
        shown: dict[str, object] = {name: value for name, value in fields.items() if value}
        if ids:
            shown["message_ids"] = ids
        return shown


class Jobs:
    """The console's replay and discard jobs (the last JOBS_KEPT of them)."""

    def __init__(self, reader: DeadLetterReader) -> None:
        self._reader = reader
        self._jobs: dict[str, Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)

    def start(
        self,
        kind: Kind,
        principal: Principal,
        selection: ReplayFilter,
        *,
        dry_run: bool,
        rate: float,
        limit: int = 0,
    ) -> Job:
        """Start a job; it runs after every pass over the DLQ already begun."""
        job = Job(
            f"{int(time.time())}-{next(self._ids)}",
            kind,
            principal.subject,
            selection,
            dry_run,
            min(max(rate, 0.0), MAX_RATE),
            limit,
        )
        self._jobs[job.id] = job
        for old in list(self._jobs)[:-JOBS_KEPT]:
            del self._jobs[old]
        task = asyncio.create_task(self._run(job, principal), name=f"console-{kind}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def get(self, job_id: str) -> Job | None:
        """A job by id."""
        return self._jobs.get(job_id)

    async def wait(self, job: Job, within: float) -> None:
        """Until ``job`` has ended or ``within`` seconds have passed, whichever is first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(job.ended.wait(), within)

    async def aclose(self) -> None:
        """Cancel running jobs: each releases what it held before it ends."""
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, job: Job, principal: Principal) -> None:
        def listed(message: Message, chosen: bool) -> None:
            if chosen and len(job.listed) < LISTED_PER_JOB:
                job.listed.append(DeadLetterView.of(message))

        reader = self._reader
        try:
            async with reader.passes:
                if job.kind == "replay":
                    job.report = await replay(
                        reader.sqs,
                        reader.dlq_url,
                        reader.queue_url,
                        job.selection,
                        rate_per_second=job.rate,
                        dry_run=job.dry_run,
                        limit=job.limit,
                        on_message=listed,
                    )
                else:
                    job.report = await discard(
                        reader.sqs,
                        reader.dlq_url,
                        job.selection,
                        rate_per_second=job.rate,
                        dry_run=job.dry_run,
                        limit=job.limit,
                        on_message=listed,
                    )
            job.state = "done"
        except Exception as exc:
            job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"[:300]
        finally:
            if not job.dry_run:
                reader.invalidate()
            job.ended.set()
            _audit(job, principal)


def _audit(job: Job, principal: Principal) -> None:
    report = job.report
    audit(
        principal,
        job.kind,
        filter=job.described_filter(),
        dry_run=job.dry_run,
        rate=job.rate,
        count=report.chosen if job.dry_run else report.moved,
        matched=report.matched,
        failed=report.failed,
        outcome=job.state if not job.error else f"failed: {job.error}",
        job=job.id,
    )
