"""The heartbeat: keeps long-running messages invisible so SQS does not hand them out again.

Every sixth of the visibility timeout, each tracked message with less than half of it left
gets a whole timeout more. Only tracked messages are extended: a message is untracked before
its outcome is applied, so an extension never undoes a Retry's delay or a Release.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping

from .. import metrics
from .dispatch import Tracked
from .outcomes import Message

Extend = Callable[[Message, int], Awaitable[None]]


class Heartbeat:
    """Extends the visibility of the messages in ``tracked`` while they run."""

    def __init__(
        self, tracked: Mapping[str, Tracked], timeout_seconds: int, extend: Extend
    ) -> None:
        self._tracked = tracked
        self._timeout = timeout_seconds
        self._extend_visibility = extend
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start beating in the background."""
        self._task = asyncio.create_task(self._beat(), name="heartbeat")

    async def stop(self) -> None:
        """Stop beating and wait until no extension is on its way."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _beat(self) -> None:
        timeout = self._timeout
        while True:
            await asyncio.sleep(max(1.0, timeout / 6))
            now = time.monotonic()
            due = [t for t in self._tracked.values() if t.visible_until - now < timeout / 2]
            for entry in due:
                entry.visible_until = now + timeout
            await asyncio.gather(*(self._extend(entry.message) for entry in due))

    async def _extend(self, message: Message) -> None:
        with contextlib.suppress(Exception):  # a lost extension only risks a duplicate delivery
            await self._extend_visibility(message, self._timeout)
            metrics.visibility_extensions.inc()
