"""The message pipeline: open the envelope, dispatch on ``op``, deliver to every target at once.

``Pipeline.handle`` turns one message into one outcome; the poller applies it. What a failure
means is decided in one place, the table in ``service/errors.py``; this module only routes on
its answer, in two spots:

- ``handle``: an envelope that can never be opened (``EnvelopeError``: malformed, tampered,
  or a KMS answer the table calls REFUSE), an unknown op or an invalid payload is
  dead-lettered; any other failure to open it (KMS unavailable, or refusing courier's own role)
  and a retryable failure of the status table retry the message with backoff; a refusal of the
  status table (``StatusRefusedError``: courier's bug) escapes to the poller, which logs
  ``handler_error`` and retries with backoff: the message is not at fault (on the queue's
  last receive it is dead-lettered as ``retries_exhausted`` if nobody fixed the cause);
- ``_verdict``, per target: any target that refused (REFUSE: a 4xx other than 408/425/429)
  dead-letters the message, anything else (RETRY, or MISCONFIGURED: a target whose secret
  cannot be read) retries it with backoff, all delivered acknowledges it. A retry on the
  queue's last receive is dead-lettered instead (``Retry.exhausted``, applied by the
  dispatcher), and the request recorded ``failed`` with why.

Status writes: one per finished request: ``completed`` before the ack (the whole record, from
the fields the API sealed into the event, sharing a BatchWriteItem with the other messages
finishing at the same time); ``failed`` only once
the DLQ copy exists (the poller runs it between the move and the delete), so a message is
never dropped as finished while its only copy could still be lost. Per-target progress is
written only when an attempt ends with some targets delivered and others pending, so a
redelivery skips them. The status record is read only for a message that may be a second
copy: received before (receive count > 1), replayed from the DLQ (``replayed``), or re-sent
by the API after an ambiguous send (``attempt``), so the happy path reads nothing. One case
is left to the targets' ``Idempotency-Key``: when a send that timed out had in fact queued
its copy and the API's re-send (``attempt`` 2) finished first, that first copy arrives
unmarked and is delivered again; closing it would cost a read per message. Whatever the
order, ``completed`` is final: a copy that ends later cannot write over it (StatusStore).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from ..envelope import EnvelopeCipher, OpenedEnvelope
from ..errors import (
    MISCONFIGURED,
    REFUSE,
    CircuitOpenError,
    EnvelopeError,
    TargetHttpError,
    TargetMisconfiguredError,
    classify,
    is_retryable,
    told_wait,
)
from ..operations import OPERATIONS
from ..settings import WorkerSettings
from ..status import RequestCompletedError, RequestState, StatusStore, completed_record
from .outcomes import Ack, DeadLetter, Message, Outcome, Retry, backoff_seconds
from .targets import Delivery, TargetClient

log = logging.getLogger("courier.pipeline")

DELIVERED, PENDING, FAILED = "delivered", "pending", "failed"
# A pause about to end still waits this long before the message comes back: no receive spin.
MIN_TOLD_DELAY_SECONDS = 1.0
# Receives for which a told wait is honoured exactly; later ones also wait out the backoff.
TOLD_EXACT_RECEIVES = 3


class Pipeline:
    """Processes messages of every known operation."""

    def __init__(
        self,
        envelope: EnvelopeCipher,
        status: StatusStore,
        targets: Sequence[TargetClient],
        settings: WorkerSettings,
    ) -> None:
        self._envelope = envelope
        self._status = status
        self._targets = list(targets)
        self._settings = settings

    async def handle(self, message: Message) -> Outcome:
        """The outcome of processing ``message`` once."""
        try:
            opened = await self._envelope.open(message.body)
        except EnvelopeError as exc:
            return DeadLetter(exc.reason, detail=str(exc))
        except Exception as exc:
            return self._transient(message, exc)
        operation = OPERATIONS.get(opened.op)
        if operation is None:
            return DeadLetter("unknown_op", detail=f"no operation named {opened.op[:64]!r}")
        problems = operation.event_errors(opened.payload)
        if problems:
            return DeadLetter("invalid_payload", detail="; ".join(problems)[:256])
        try:
            return await self._deliver(message, opened)
        except Exception as exc:
            if not is_retryable(exc):
                raise
            return self._transient(message, exc)

    async def _deliver(self, message: Message, opened: OpenedEnvelope) -> Outcome:
        states = await self._previous_states(message, opened.id)
        if states is None:
            return Ack("duplicate")
        pending = [t for t in self._targets if states.get(t.name) != DELIVERED]
        operation = OPERATIONS[opened.op]
        results = await asyncio.gather(
            *(self._call(target, operation, opened, message) for target in pending),
            return_exceptions=True,
        )
        failures: dict[str, BaseException] = {}
        for target, result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                failures[target.name] = result
            else:
                states[target.name] = DELIVERED
        return await self._verdict(
            message, opened, states, failures, delivered_now=len(pending) - len(failures)
        )

    async def _previous_states(self, message: Message, request_id: str) -> dict[str, str] | None:
        """Per-target states to resume from; None when another delivery finished the request.

        Only a message that may be a second copy is checked (see the module docstring): the
        first receive of a first send resumes from nothing without a read.
        """
        replayed = bool(message.attributes.get("replayed"))
        resent = bool(message.attributes.get("attempt"))
        if message.receive_count <= 1 and not replayed and not resent:
            return {}
        record = await self._status.get(request_id)
        if record is None:
            return {}
        if record.state is RequestState.COMPLETED:
            return None
        # Failed means its DLQ copy exists. It is final, except when an operator replays it
        # (after fixing the target that refused it): then the targets not delivered are called.
        if record.state is RequestState.FAILED and not replayed:
            return None
        # Any other state (accepted, processing, or the API's pending / send_failed) is not
        # terminal: finish the job from the per-target states.
        return dict(record.targets)

    async def _call(
        self, target: TargetClient, operation: Any, opened: OpenedEnvelope, message: Message
    ) -> None:
        body, content_type = operation.render(target.settings.format, opened.id, opened.payload)
        await target.deliver(
            Delivery(opened.id, body, content_type, message.attributes.get("traceparent", ""))
        )

    async def _verdict(
        self,
        message: Message,
        opened: OpenedEnvelope,
        states: dict[str, str],
        failures: Mapping[str, BaseException],
        delivered_now: int,
    ) -> Outcome:
        permanent = {name: exc for name, exc in failures.items() if classify(exc) is REFUSE}
        if permanent:
            return self._rejected(opened, states, permanent)
        try:
            if failures:
                if delivered_now:
                    states.update({n: PENDING for n in failures})
                    await self._status.update(
                        opened.id, state=RequestState.PROCESSING, targets=states, op=opened.op
                    )
                return self._retry(message, opened, states, failures)
            await self._complete(opened, states)
        except RequestCompletedError:
            # Another copy finished the request while this one ran: nothing is left to do.
            return Ack("duplicate")
        return Ack("completed")

    async def _complete(self, opened: OpenedEnvelope, states: Mapping[str, str]) -> None:
        """``completed``: the whole record in a shared batch when the event carries its fields."""
        record = completed_record(opened.id, opened.op, states, opened.payload.get("record"))
        if record is not None:
            await self._status.complete(record)
        else:
            await self._status.update(
                opened.id, state=RequestState.COMPLETED, targets=states, op=opened.op
            )

    def _rejected(
        self,
        opened: OpenedEnvelope,
        states: dict[str, str],
        permanent: Mapping[str, BaseException],
    ) -> DeadLetter:
        name, exc = next(iter(permanent.items()))
        states.update({n: FAILED for n in permanent})
        # Recorded by the poller once the DLQ copy exists, not now (see the module docstring).
        mark_failed = functools.partial(
            self._status.update,
            opened.id,
            state=RequestState.FAILED,
            targets=dict(states),
            error=str(exc)[:256],
            op=opened.op,
        )
        return DeadLetter(
            "target_rejected", target=name, detail=str(exc)[:256], after_move=mark_failed
        )

    def _retry(
        self,
        message: Message,
        opened: OpenedEnvelope,
        states: Mapping[str, str],
        failures: Mapping[str, BaseException],
    ) -> Retry:
        reasons = ", ".join(f"{name}: {_describe(exc)}" for name, exc in failures.items())
        log.info(
            "delivery incomplete, retrying",
            extra={"fields": {"event": "delivery_retry", "reasons": reasons[:300]}},
        )
        # Used only if this was the queue's last receive (Retry.exhausted): then the request
        # is failed, with the targets still failing marked so and the delivered ones kept.
        mark_failed = functools.partial(
            self._status.update,
            opened.id,
            state=RequestState.FAILED,
            targets={**states, **dict.fromkeys(failures, FAILED)},
            error=f"retries exhausted: {reasons}"[:256],
            op=opened.op,
        )
        return Retry(
            retry_delay(message, failures.values(), self._settings),
            reasons,
            target=next(iter(failures)),
            after_move=mark_failed,
        )

    def _transient(self, message: Message, exc: BaseException) -> Retry:
        """Back to the queue with backoff: courier's own call failed, the message is not at fault."""
        delay = backoff_seconds(
            message.receive_count,
            self._settings.backoff_base_seconds,
            self._settings.backoff_max_seconds,
        )
        decision = classify(exc)
        # A misconfiguration does not clear by itself: say so louder than an outage.
        level = logging.WARNING if decision is MISCONFIGURED else logging.INFO
        log.log(
            level,
            "courier's own call failed, retrying the message",
            extra={
                "fields": {
                    "event": "message_retry",
                    "decision": decision.value,
                    "error": _describe(exc),
                }
            },
        )
        return Retry(delay, _describe(exc), after_move=self._fail_by_attributes(message, exc))

    def _fail_by_attributes(
        self, message: Message, exc: BaseException
    ) -> Callable[[], Awaitable[None]] | None:
        """Records the request ``failed`` if this was the last receive (``Retry.exhausted``),
        named by the message's attributes: the envelope may be what could not be opened."""
        request_id = message.attributes.get("request_id")
        if not request_id:
            return None
        return functools.partial(
            self._status.update,
            request_id,
            state=RequestState.FAILED,
            error=f"retries exhausted: {_describe(exc)}"[:256],
            op=message.attributes.get("op") or None,
        )


def retry_delay(
    message: Message, failures: Iterable[BaseException], settings: WorkerSettings
) -> float:
    """When an incomplete delivery comes back.

    When every failure says when (a target's Retry-After or pause, an open circuit's
    cool-down), then, for the first ``TOLD_EXACT_RECEIVES`` receives: a target that asked for
    5 s is not made to wait minutes. After that, never sooner than the backoff on the receive
    count: every return spends a receive, and SQS dead-letters a message after
    ``maxReceiveCount``, which must outlast a target down for hours however short its
    Retry-After. A failure that says nothing gets the backoff; an open circuit is never
    left sooner than its cool-down.
    """
    failures = list(failures)
    told = [told_wait(exc) for exc in failures]
    waits = [seconds for seconds in told if seconds is not None]
    exact = not any(isinstance(exc, CircuitOpenError) for exc in failures)
    if len(waits) == len(told) and exact and message.receive_count <= TOLD_EXACT_RECEIVES:
        return max(MIN_TOLD_DELAY_SECONDS, *waits)
    delay = backoff_seconds(
        message.receive_count, settings.backoff_base_seconds, settings.backoff_max_seconds
    )
    return max([delay, *waits])


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TargetHttpError):
        return f"HTTP {exc.status}"
    if isinstance(exc, TargetMisconfiguredError):
        return f"{exc.reason}: {exc}"[:120]
    return f"{type(exc).__name__}: {exc}"[:120]
