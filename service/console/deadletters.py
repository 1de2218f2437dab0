"""The DLQ as the console shows it: one read of what it holds, grouped by reason, target and op.

A read is ``courier replay --dry-run``'s own pass (``service.worker.replay.replay`` with
``dry_run``): every message is received with a short listing visibility, looked at, and made
visible again at the end, untouched. Reads are cached for ``ttl`` seconds and shared by
concurrent pages (the DLQ is read once however many tabs are open), and one pass runs at a
time. A page never waits for an action (replay, discard): while one runs or waits for the
pass, pages get the last read marked stale, or, when there is none, an "unread" snapshot that
says which action holds the DLQ and how far it got.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..worker.dlq import DeadLetterInfo
from ..worker.outcomes import Message
from ..worker.replay import ReplayFilter, ReplayReport, replay

# A read stops after this many messages: the pages say so, and actions by filter still reach
# every message (they make their own pass).
MAX_READ = 2000
SNAPSHOT_TTL_SECONDS = 10.0
# SQS's redrive (after maxReceiveCount) moves a message without courier's ``dlq`` attribute:
# the cases courier's own last-receive dead-lettering misses (service/worker/dlq.py).
REDRIVE = "(redrive)"


@dataclass(frozen=True, slots=True)
class DeadLetterView:
    """One DLQ message as the pages show it (the body stays sealed until its page opens it)."""

    message_id: str
    request_id: str
    op: str
    reason: str
    target: str
    detail: str
    receive_count: int  # receives of the original before it was dead-lettered
    failed_at: float  # Unix time of the move (or the DLQ's SentTimestamp for a redrive)
    attributes: Mapping[str, str]
    body: str

    @classmethod
    def of(cls, message: Message) -> DeadLetterView:
        """The view of a received DLQ message."""
        info = DeadLetterInfo.of(message.attributes)
        attributes = message.attributes
        return cls(
            message_id=message.message_id,
            request_id=attributes.get("request_id", ""),
            op=attributes.get("op", ""),
            reason=info.reason if info else REDRIVE,
            target=info.target if info else "",
            detail=info.detail if info else "moved by the queue's redrive policy",
            receive_count=info.receive_count if info else 0,
            failed_at=(info.failed_at if info else 0.0) or message.sent_at,
            attributes=dict(attributes),
            body=message.body,
        )

    @property
    def group(self) -> tuple[str, str, str]:
        """(reason, target, op): what the groups table counts by."""
        return self.reason, self.target, self.op


@dataclass(frozen=True, slots=True)
class Group:
    """Messages of one (reason, target, op), with the oldest and newest failure time."""

    reason: str
    target: str
    op: str
    count: int
    oldest: float
    newest: float


@dataclass(frozen=True, slots=True)
class Running:
    """The action holding (or first waiting for) the DLQ, as a page tells of it."""

    job_id: str
    kind: str
    examined: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one read of the DLQ found."""

    letters: tuple[DeadLetterView, ...]
    taken_at: float
    complete: bool  # False when the read stopped at MAX_READ
    # Set while an action holds the DLQ: the read is served stale (it may no longer be true)
    # and ``running`` says which action; with ``taken_at`` 0 there was no read to serve at all.
    running: Running | None = None

    @classmethod
    def unread(cls, running: Running) -> Snapshot:
        """No read to show: ``running`` holds the DLQ and the page does not wait for it."""
        return cls((), 0.0, complete=False, running=running)

    @property
    def absent(self) -> bool:
        """Whether there was no read at all (an action held the DLQ before the first one)."""
        return self.taken_at == 0.0

    def groups(self) -> list[Group]:
        """The groups, largest first."""
        grouped: dict[tuple[str, str, str], list[DeadLetterView]] = {}
        for letter in self.letters:
            grouped.setdefault(letter.group, []).append(letter)
        groups = [
            Group(
                *key,
                count=len(members),
                oldest=min(m.failed_at for m in members),
                newest=max(m.failed_at for m in members),
            )
            for key, members in grouped.items()
        ]
        return sorted(groups, key=lambda g: (-g.count, g.reason, g.target, g.op))

    def matching(self, reason: str = "", target: str = "", op: str = "") -> list[DeadLetterView]:
        """The letters of a filter (empty fields match everything), newest first."""
        found = [
            letter
            for letter in self.letters
            if (not reason or letter.reason == reason)
            and (not target or letter.target == target)
            and (not op or letter.op == op)
        ]
        return sorted(found, key=lambda letter: -letter.failed_at)

    def find(self, message_id: str) -> DeadLetterView | None:
        """The letter with ``message_id``, if this read saw it."""
        return next((m for m in self.letters if m.message_id == message_id), None)

    def for_request(self, request_id: str) -> list[DeadLetterView]:
        """The DLQ copies of one request."""
        return [m for m in self.letters if m.request_id == request_id]

    def oldest_failed_at(self) -> float | None:
        """When the oldest letter failed (Unix time), or None when the DLQ was empty."""
        if not self.letters:
            return None
        return min(m.failed_at for m in self.letters)


def selection(
    reason: str, target: str, op: str, message_ids: Iterable[str], snapshot: Snapshot | None
) -> ReplayFilter:
    """The replay filter of a console selection: the filter fields, narrowed to the chosen ids.

    Redriven messages have no reason to filter on: they are selected by id, from the read.
    """
    ids = frozenset(message_ids)
    if not ids and reason == REDRIVE:
        found = snapshot.matching(reason, target, op) if snapshot is not None else []
        # Nothing found: select nothing, never everything (the reason is dropped below).
        ids = frozenset(m.message_id for m in found) or frozenset({"(none)"})
    # With ids the filter fields stay too (the picks were listed under them): the audit line
    # and the action's page say which group they came from.
    reason = "" if reason == REDRIVE else reason
    return ReplayFilter(reason=reason, target=target, op=op, message_ids=ids)


class DeadLetterReader:
    """Reads the DLQ (cached, shared) and serialises the passes actions make over it."""

    def __init__(
        self,
        sqs: Any,
        dlq_url: str,
        queue_url: str,
        *,
        max_read: int = MAX_READ,
        ttl_seconds: float = SNAPSHOT_TTL_SECONDS,
    ) -> None:
        self.sqs = sqs
        self.dlq_url = dlq_url
        self.queue_url = queue_url
        self._max_read = max_read
        self._ttl = ttl_seconds
        self._snapshot: Snapshot | None = None
        self._stale = False  # an action changed the DLQ since the last read
        # Actions started and not ended (running or waiting for the pass), oldest first.
        self._actions: dict[str, tuple[str, ReplayReport]] = {}
        # One pass over the DLQ at a time: a read and a replay would hide messages from each other.
        self.passes = asyncio.Lock()

    @property
    def last(self) -> Snapshot | None:
        """The latest read, however old."""
        return self._snapshot

    @property
    def running(self) -> Running | None:
        """The oldest action not ended (it holds the pass, or is next), or None."""
        for job_id, (kind, report) in self._actions.items():
            return Running(job_id, kind, report.examined)
        return None

    def reserve(self, job_id: str, kind: str, report: ReplayReport) -> None:
        """An action is about to take the pass: from now on pages stop reading the DLQ.

        Called before the action waits for ``passes``, so a page that did not see it is
        ahead of it in the lock's queue (the lock is FIFO) and waits for a read only.
        """
        self._actions[job_id] = (kind, report)

    def release(self, job_id: str, *, changed: bool) -> None:
        """The action ``job_id`` ended; when it ``changed`` the DLQ the next page reads again
        (the last read stays, marked stale, for pages served while another action runs)."""
        self._actions.pop(job_id, None)
        self._stale = self._stale or changed

    def mark_stale(self) -> None:
        """The next ``snapshot`` reads again (when no action holds the DLQ)."""
        self._stale = True

    def _fresh(self) -> Snapshot | None:
        current = self._snapshot
        if current is None or self._stale or time.time() - current.taken_at >= self._ttl:
            return None
        return current

    async def snapshot(self) -> Snapshot:
        """A read at most ``ttl`` seconds old; never waits for an action (see the module)."""
        running = self.running
        if running is not None:
            # The action may be changing the DLQ: whatever the read's age, it is not vouched for.
            last = self._snapshot
            if last is None:
                return Snapshot.unread(running)
            return dataclasses.replace(last, running=running)
        current = self._fresh()
        if current is not None:
            return current
        # Only another page's read can hold the pass now: share its result.
        async with self.passes:
            current = self._fresh()
            if current is None:
                current = self._snapshot = await self._read()
                self._stale = False
            return current

    async def _read(self) -> Snapshot:
        letters: list[DeadLetterView] = []

        def keep(message: Message, _chosen: bool) -> None:
            letters.append(DeadLetterView.of(message))

        started = time.time()
        report = await replay(
            self.sqs,
            self.dlq_url,
            self.queue_url,
            ReplayFilter(),
            dry_run=True,
            limit=self._max_read,
            on_message=keep,
        )
        return Snapshot(tuple(letters), started, report.chosen < self._max_read)
