"""The SQS poller: concurrent long-polls feeding a bounded number of messages in flight.

``Poller`` coordinates four pieces, one per concern:

- ``receive``: the long-poll loops, how many run, and the in-flight bound they respect;
- ``dispatch``: one task per message (per group on FIFO queues) running the handler;
- ``acknowledge``: applying each outcome (delete, visibility change, DLQ move), batched;
- ``heartbeat``: keeping long-running messages invisible;
- ``redrive``: the queue's ``maxReceiveCount``, on which a retry is dead-lettered instead.

``start`` begins polling; ``stop`` stops it, lets in-flight work finish within a bound,
releases what did not, and flushes pending deletes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..queue import is_fifo
from ..settings import WorkerSettings
from .acknowledge import Acknowledger
from .dispatch import Dispatcher
from .heartbeat import Heartbeat
from .outcomes import DeadLetterSink, Handler, Message, Release
from .receive import Capacity, Receiver
from .redrive import RedriveLimit

log = logging.getLogger("courier.poller")


class Poller:
    """Polls one queue and runs ``handler`` on every message, from ``start`` until ``stop``."""

    def __init__(
        self,
        sqs: Any,
        queue_url: str,
        handler: Handler,
        settings: WorkerSettings,
        dead_letter: DeadLetterSink,
        *,
        redrive: RedriveLimit | None = None,
    ) -> None:
        """``redrive``: the queue's receive limit; without one, retries never end early."""
        self.sqs = sqs
        self.queue_url = queue_url
        self.settings = settings
        self.fifo = is_fifo(queue_url)
        capacity = Capacity(settings.max_in_flight)
        self._acknowledger = Acknowledger(sqs, queue_url, dead_letter, settings.ack_linger_seconds)
        self._redrive = redrive
        self._dispatcher = Dispatcher(
            handler, settings, capacity, self._acknowledger.apply, fifo=self.fifo, redrive=redrive
        )
        self._receiver = Receiver(sqs, queue_url, settings, capacity, self._dispatcher.dispatch)
        self._heartbeat = Heartbeat(
            self._dispatcher.tracked,
            settings.visibility_timeout_seconds,
            self._acknowledger.extend,
        )

    @property
    def handler(self) -> Handler:
        """What runs each message; replaceable while running (tests wrap it)."""
        return self._dispatcher.handler

    @handler.setter
    def handler(self, handler: Handler) -> None:
        self._dispatcher.handler = handler

    @property
    def dead_letter(self) -> DeadLetterSink:
        """What moves a message to the DLQ; replaceable while running."""
        return self._acknowledger.dead_letter

    @dead_letter.setter
    def dead_letter(self, dead_letter: DeadLetterSink) -> None:
        self._acknowledger.dead_letter = dead_letter

    @property
    def in_flight(self) -> int:
        """Messages being processed now."""
        return len(self._dispatcher.tracked)

    def start(self) -> None:
        """Start the pollers, the heartbeat and the redrive policy's reads."""
        if self._redrive is not None:
            self._redrive.start()
        self._receiver.start()
        self._heartbeat.start()

    def stop_polling(self) -> None:
        """Receive nothing more (in-flight work goes on)."""
        self._receiver.stop()

    async def stop(self, drain_seconds: float) -> None:
        """Stop polling, finish in-flight work within ``drain_seconds``, release the rest, flush."""
        self.stop_polling()
        if self._redrive is not None:  # the limit it read stays in use for what is in flight
            await self._redrive.stop()
        await self._receiver.join()
        interrupted = await self._receiver.take_interrupted()
        await self._release(interrupted)
        await self._dispatcher.finish_within(drain_seconds)
        # The heartbeat stops first: an extension racing a release would hide the message again.
        await self._heartbeat.stop()
        # Untracked as they are released, so a second stop cannot release them again later,
        # with receipt handles that another poller may since have been given a newer one of.
        unfinished = self._dispatcher.untrack_all()
        await self._release(unfinished)
        await self._acknowledger.drain()
        log.info(
            # The event keeps its name from before the poller was called so: alerts and the
            # chaos checks match on it.
            "consumer stopped",
            extra={"fields": {"event": "consumer_stopped", "released": len(unfinished)}},
        )

    async def _release(self, messages: list[Message]) -> None:
        release = Release()
        await asyncio.gather(
            *(self._acknowledger.apply(m, release) for m in messages), return_exceptions=True
        )
