"""Single-flight calls: concurrent callers asking for the same key share one in-flight call.

Used wherever a miss is expensive and many callers miss at once: KMS data keys
(``envelope.py``) and secrets (``secrets/cache.py``). Callers share the call's result or its
error; errors are never kept, so the next caller after a failure starts a new call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """At most one running call per key; every caller of that key waits on the same call."""

    def __init__(self) -> None:
        self._calls: dict[K, asyncio.Task[V]] = {}

    def start(
        self, key: K, call: Callable[[], Coroutine[Any, Any, V]], *, name: str | None = None
    ) -> asyncio.Task[V]:
        """The call running for ``key``, or a new task running ``call()`` if there is none."""
        task = self._calls.get(key)
        # A finished task lingers until its done-callback runs; reusing it would hand back a
        # stale result (an exhausted data key) without yielding, and callers looping on
        # "key exhausted, get another" would spin forever.
        if task is None or task.done():
            task = asyncio.create_task(call(), name=name)
            self._calls[key] = task
            task.add_done_callback(lambda done: self._finish(key, done))
        return task

    async def run(self, key: K, call: Callable[[], Coroutine[Any, Any, V]]) -> V:
        """Await the call for ``key`` (starting it if needed); its result or its error."""
        # Shielded: one waiter being cancelled must not cancel the call the others wait on.
        return await asyncio.shield(self.start(key, call))

    def running(self, key: K) -> bool:
        """Whether a call for ``key`` is in flight."""
        task = self._calls.get(key)
        return task is not None and not task.done()

    async def cancel_all(self) -> None:
        """Cancel every call in flight and wait until they have ended."""
        tasks = list(self._calls.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _finish(self, key: K, task: asyncio.Task[V]) -> None:
        if self._calls.get(key) is task:
            del self._calls[key]
        if not task.cancelled():
            task.exception()  # retrieved here, so a call nobody awaits any more logs no warning
