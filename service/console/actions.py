"""Replay and discard from the console: ``courier replay``'s own functions, run as jobs.

A job runs ``service.worker.replay.replay`` (or ``discard``, the same pass deleting instead of
moving) in a task of its own, so a slow replay (``rate`` messages per second) never holds a
request open; its page follows it until it ends, with the counts so far (``replay`` fills
the job's report as it goes). A DLQ copy leaves the DLQ only after the work queue accepted the
replayed message: that is ``replay``'s rule, not this module's. Every job writes two
``console_audit`` lines: ``<kind>_started`` when accepted (who, what, the filter), and
``<kind>`` when it ends, done, failed or cancelled, with the counts it reached (and who
stopped it, when someone pressed Stop: the pass finishes the move under way, then releases
what it held).

At most MAX_PENDING jobs run or wait at once (one runs: they share the DLQ's one pass), and
none slower than MIN_RATE: a job holds the DLQ for its whole run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import asdict, dataclass, field
from functools import partial
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
MIN_RATE = 0.1  # messages/s: slower would hold the DLQ (and every other action) for days
MAX_RATE = 1000.0
MAX_PENDING = 2  # one running and one waiting
# How long a stopping process waits for its jobs: the worker and the API drain meanwhile.
CLOSE_SECONDS = 2.0


class Refused(Exception):
    """A job not started: ``status`` and why, for the page."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


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
    state: Literal["running", "done", "failed", "cancelled"] = "running"
    waiting: bool = True  # for the pass (another job holds it)
    report: ReplayReport = field(default_factory=ReplayReport)
    listed: list[DeadLetterView] = field(default_factory=list)
    error: str = ""
    stopped_by: str = ""  # who pressed Stop ("" when it was not stopped, or the console stopped)
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
        self._tasks: dict[str, asyncio.Task[None]] = {}  # job id -> task, while it runs or waits
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
        """Start a job; it runs after every pass over the DLQ already begun.

        Raises Refused (400) for a rate outside MIN_RATE..MAX_RATE (or nan), or (429) when MAX_PENDING jobs are
        already running or waiting.
        """
        if not MIN_RATE <= rate <= MAX_RATE:  # false for nan too (a rate that is not a number)
            raise Refused(400, f"the rate must be {MIN_RATE} to {MAX_RATE:.0f} messages/s")
        if len(self._tasks) >= MAX_PENDING:
            raise Refused(
                429,
                f"{len(self._tasks)} actions are already running or waiting: "
                "wait for one to end, then try again",
            )
        job = Job(
            f"{int(time.time())}-{next(self._ids)}",
            kind,
            principal.subject,
            selection,
            dry_run,
            rate,
            limit,
        )
        self._jobs[job.id] = job
        for old in list(self._jobs)[:-JOBS_KEPT]:
            del self._jobs[old]
        _audit_start(job, principal)
        self._reader.reserve(job.id, job.kind, job.report)
        task = asyncio.create_task(self._run(job), name=f"console-{kind}")
        self._tasks[job.id] = task
        # The end is recorded here, not in _run: a task cancelled before it began never runs.
        task.add_done_callback(partial(self._ended, job, principal))
        return job

    def queued(self, job: Job) -> bool:
        """Whether ``job`` waits behind another (its POST then answers at once)."""
        running = self._reader.running
        return running is not None and running.job_id != job.id

    def get(self, job_id: str) -> Job | None:
        """A job by id."""
        return self._jobs.get(job_id)

    def stop(self, job: Job, principal: Principal) -> None:
        """Stop ``job`` if it still runs or waits; its end is audited with who stopped it
        (the first to ask: asking again changes nothing)."""
        task = self._tasks.get(job.id)
        if task is None or task.done() or job.stopped_by:
            return
        job.stopped_by = principal.subject
        task.cancel()

    async def wait(self, job: Job, within: float) -> None:
        """Until ``job`` has ended or ``within`` seconds have passed, whichever is first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(job.ended.wait(), within)

    async def aclose(self, within: float = CLOSE_SECONDS) -> None:
        """Cancel running jobs and wait ``within`` seconds for them to end.

        A job first finishes the move under way (send, then delete), then releases what it
        held: milliseconds as a rule, but bounded only by the SQS client's timeouts while SQS
        is slow, and the process must stop within systemd's TimeoutStopSec. A job still
        running then is logged and left to end as the process does: a move cut between its
        send and its delete replays that message twice (the second copy finds the request
        completed, or the targets' Idempotency-Key absorbs it); nothing is lost, and what it
        held is visible again within 60 s.
        """
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=within)
        if pending:
            running = [job_id for job_id, task in self._tasks.items() if task in pending]
            log.warning(
                "console action still running at shutdown, left to end with the process",
                extra={
                    "fields": {
                        "event": "console_action_unfinished",
                        "jobs": running,
                        "waited_seconds": within,
                    }
                },
            )

    async def _run(self, job: Job) -> None:
        def listed(message: Message, chosen: bool) -> None:
            if chosen and len(job.listed) < LISTED_PER_JOB:
                job.listed.append(DeadLetterView.of(message))

        reader = self._reader
        try:
            async with reader.passes:
                job.waiting = False
                if job.kind == "replay":
                    run = partial(replay, reader.sqs, reader.dlq_url, reader.queue_url)
                else:
                    run = partial(discard, reader.sqs, reader.dlq_url)
                await run(
                    job.selection,
                    rate_per_second=job.rate,
                    dry_run=job.dry_run,
                    limit=job.limit,
                    on_message=listed,
                    report=job.report,
                )
            job.state = "done"
        except asyncio.CancelledError:
            # Stop pressed, or the process is stopping: replay released what it held.
            job.state = "cancelled"
            raise
        except Exception as exc:
            job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"[:300]

    def _ended(self, job: Job, principal: Principal, task: asyncio.Task[None]) -> None:
        self._tasks.pop(job.id, None)
        if job.state == "running":  # cancelled before it began
            job.state = "cancelled"
        report = job.report
        changed = not job.dry_run and (report.moved > 0 or report.failed > 0)
        self._reader.release(job.id, changed=changed)
        job.ended.set()
        _audit(job, principal)


def _audit_start(job: Job, principal: Principal) -> None:
    audit(
        principal,
        f"{job.kind}_started",
        filter=job.described_filter(),
        dry_run=job.dry_run,
        rate=job.rate,
        limit=job.limit,
        job=job.id,
    )


def _audit(job: Job, principal: Principal) -> None:
    report = job.report
    audit(
        principal,
        job.kind,
        filter=job.described_filter(),
        dry_run=job.dry_run,
        rate=job.rate,
        count=report.chosen if job.dry_run else report.moved,
        examined=report.examined,
        matched=report.matched,
        failed=report.failed,
        skipped=report.skipped,
        outcome=job.state if not job.error else f"failed: {job.error}",
        job=job.id,
        **({"stopped_by": job.stopped_by} if job.stopped_by else {}),
    )
