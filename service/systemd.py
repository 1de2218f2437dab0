"""systemd integration: sd_notify (READY, STATUS, STOPPING) and the watchdog, without libsystemd.

The watchdog ping is sent from a task on the event loop, so a blocked loop stops the pings
and systemd restarts the process (``WatchdogSec=``). Outside systemd (no NOTIFY_SOCKET)
every call is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Mapping

log = logging.getLogger("courier.systemd")


class Notifier:
    """Sends sd_notify datagrams to ``$NOTIFY_SOCKET``."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._address = "\0" + address[1:] if address and address.startswith("@") else address
        self._watchdog_usec = watchdog_usec

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """A notifier for this process, configured the way systemd passes it."""
        env = os.environ if environ is None else environ
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watchdog = int(usec) if usec.isdigit() and (not pid or pid == str(os.getpid())) else None
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog)

    @property
    def enabled(self) -> bool:
        """Whether systemd is listening."""
        return bool(self._address)

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of WatchdogSec), or None when there is no watchdog."""
        return self._watchdog_usec / 2_000_000 if self._watchdog_usec and self.enabled else None

    def send(self, **fields: str) -> None:
        """Send ``KEY=value`` lines; failures are logged, never raised (observability must not kill us)."""
        if not self._address:
            return
        payload = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, self._address)
        except OSError as exc:
            log.warning(
                "sd_notify failed",
                extra={"fields": {"event": "sd_notify_failed", "error": str(exc)}},
            )

    def ready(self, status: str) -> None:
        """READY=1 with a status line."""
        self.send(READY="1", STATUS=status)

    def status(self, text: str) -> None:
        """A STATUS= line (shown by ``systemctl status``)."""
        self.send(STATUS=text)

    def stopping(self, status: str) -> None:
        """STOPPING=1 with a status line."""
        self.send(STOPPING="1", STATUS=status)

    async def watchdog(self) -> None:
        """Ping the watchdog at half its interval, forever (run as a task; cancel to stop)."""
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            self.send(WATCHDOG="1")
            await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def watchdog_running(notifier: Notifier) -> AsyncIterator[None]:
    """Run the watchdog pings for the duration of the block."""
    task = asyncio.create_task(notifier.watchdog(), name="systemd-watchdog")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
