"""Dispatching: one task per message (per message group on FIFO queues) running the handler.

A slow message never holds back the rest: each message is its own task. On a FIFO queue the
messages of one MessageGroupId in a batch run one after another, and when one is not
acknowledged the rest of its group is released so order holds; other groups run in parallel.
Every message is tracked (for the heartbeat and for stopping) until its outcome is known.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .. import metrics
from ..logs import log_context
from ..settings import WorkerSettings
from .outcomes import Ack, DeadLetter, Handler, Message, Outcome, Release, Retry, backoff_seconds
from .receive import Capacity
from .redrive import RedriveLimit

# The poller and its parts (receive, dispatch, acknowledge) log as one: "courier.poller".
log = logging.getLogger("courier.poller")

Apply = Callable[[Message, Outcome], Awaitable[None]]


@dataclass
class Tracked:
    """A message in flight: until when SQS keeps it invisible, and the task running it."""

    message: Message
    visible_until: float  # time.monotonic()
    task: asyncio.Task[None] | None = None


class Dispatcher:
    """Runs ``handler`` on received messages and hands each outcome to ``apply``."""

    def __init__(
        self,
        handler: Handler,
        settings: WorkerSettings,
        capacity: Capacity,
        apply: Apply,
        *,
        fifo: bool,
        redrive: RedriveLimit | None = None,
    ) -> None:
        self.handler = handler
        # Keyed by receipt handle: what the heartbeat extends and stopping releases.
        self.tracked: dict[str, Tracked] = {}
        self._settings = settings
        self._capacity = capacity
        self._apply = apply
        self._fifo = fifo
        self._redrive = redrive

    def dispatch(self, batch: list[Message]) -> None:
        """Track every message of ``batch`` and start the tasks that run them."""
        groups: dict[str | None, list[Message]] = defaultdict(list)
        for message in batch:
            groups[message.group_id if self._fifo else message.message_id].append(message)
        deadline = time.monotonic() + self._settings.visibility_timeout_seconds
        for messages in groups.values():
            tracked = [self._track(message, deadline) for message in messages]
            task = asyncio.create_task(
                self._run_group(messages), name=f"message-{messages[0].message_id}"
            )
            for entry in tracked:
                entry.task = task

    async def finish_within(self, seconds: float) -> None:
        """Let running messages finish for ``seconds``; cancel those still running then."""
        tasks = {t.task for t in self.tracked.values() if t.task is not None}
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=seconds)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def untrack_all(self) -> list[Message]:
        """Forget every message still tracked and return them (to be released once)."""
        unfinished = [t.message for t in self.tracked.values()]
        self.tracked.clear()
        return unfinished

    def _track(self, message: Message, deadline: float) -> Tracked:
        entry = Tracked(message, deadline)
        self.tracked[message.receipt_handle] = entry
        return entry

    async def _run_group(self, messages: list[Message]) -> None:
        for position, message in enumerate(messages):
            outcome = await self._process(message)
            if not isinstance(outcome, Ack | DeadLetter):
                # FIFO: a later message must not overtake one that will be retried.
                for rest in messages[position + 1 :]:
                    await self._finish(rest, Release())
                return

    async def _process(self, message: Message) -> Outcome:
        started = time.perf_counter()
        with log_context(
            message_id=message.message_id, request_id=message.attributes.get("request_id", "")
        ):
            outcome = self._unless_last(message, await self._run_handler(message))
            metrics.processing_latency.observe(time.perf_counter() - started)
            await self._finish(message, outcome)
        return outcome

    async def _run_handler(self, message: Message) -> Outcome:
        try:
            return await self.handler(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("message handler failed", extra={"fields": {"event": "handler_error"}})
            delay = backoff_seconds(
                message.receive_count,
                self._settings.backoff_base_seconds,
                self._settings.backoff_max_seconds,
            )
            return Retry(delay, f"error: {type(exc).__name__}")

    def _unless_last(self, message: Message, outcome: Outcome) -> Outcome:
        """A retry on the queue's last receive is dead-lettered here, with its reason, rather
        than redriven by SQS without one (``service/worker/redrive.py``)."""
        if not isinstance(outcome, Retry) or self._redrive is None:
            return outcome
        if not self._redrive.is_last(message):
            return outcome
        log.warning(
            "retries exhausted, dead-lettering the message",
            extra={
                "fields": {
                    "event": "retries_exhausted",
                    "receive_count": message.receive_count,
                    "reason": outcome.reason[:300],
                }
            },
        )
        return outcome.exhausted()

    async def _finish(self, message: Message, outcome: Outcome) -> None:
        # Untracked before the outcome is applied, so the heartbeat cannot extend the message
        # after (and so undo) a Retry's delay or a Release.
        # The slot is free as soon as the outcome is known: waiting for the batched ack would
        # hold it for the linger and throttle the pollers for nothing.
        if self.tracked.pop(message.receipt_handle, None) is not None:
            self._capacity.release()
        await self._apply(message, outcome)
