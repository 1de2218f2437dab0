"""sd_notify and the watchdog, with a real datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.settings import Settings, to_toml
from service.systemd import Notifier


class FakeSystemd:
    """Collects what a process sends to NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[dict[str, str]] = []

    def collect(self, until: float) -> None:
        while time.monotonic() < until:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self._record(data)

    def drain(self) -> None:
        """Take every datagram already queued, without waiting (and without yielding)."""
        self.sock.settimeout(0)
        try:
            while True:
                try:
                    data = self.sock.recv(4096)
                except BlockingIOError:
                    return
                self._record(data)
        finally:
            self.sock.settimeout(0.1)

    def _record(self, data: bytes) -> None:
        self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def sent_keys(self) -> list[str]:
        return [key for message in self.messages for key in message if key != "STATUS"]

    def pings(self) -> int:
        return self.sent_keys().count("WATCHDOG")

    async def wait_for_pings(self, count: int, timeout: float = 15) -> None:
        """Until ``count`` more WATCHDOG pings have arrived, letting the event loop run."""
        wanted = self.pings() + count
        deadline = time.monotonic() + timeout
        while self.pings() < wanted:
            assert time.monotonic() < deadline, f"{self.pings()} pings, wanted {wanted}"
            await asyncio.sleep(0.02)
            self.drain()


@pytest.fixture
def fake_systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    server = FakeSystemd(tmp_path / "notify")
    yield server
    server.sock.close()


def test_notifier_without_socket_is_a_no_op() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready("x")  # nothing to send to, nothing raised


def test_watchdog_interval_is_half_and_pid_checked(fake_systemd: FakeSystemd) -> None:
    env = {"NOTIFY_SOCKET": str(fake_systemd.path), "WATCHDOG_USEC": "4000000"}
    assert Notifier.from_env(env).watchdog_interval == 2.0
    assert Notifier.from_env({**env, "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 2.0


async def test_blocked_loop_stops_the_pings(fake_systemd: FakeSystemd) -> None:
    """The pings come from the event loop: while it is blocked none is sent, so systemd's
    watchdog (here 100 ms) expires; once it runs again they resume."""
    notifier = Notifier(str(fake_systemd.path), watchdog_usec=100_000)  # ping every 50 ms
    task = asyncio.create_task(notifier.watchdog())
    try:
        await fake_systemd.wait_for_pings(3)
        fake_systemd.drain()  # nothing is left queued from before the block
        before = fake_systemd.pings()
        time.sleep(1.0)  # the event loop is blocked: no task runs, for 10 watchdog periods
        fake_systemd.drain()
        during = fake_systemd.pings() - before
        await fake_systemd.wait_for_pings(3)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert during == 0


def test_daemon_sends_ready_status_watchdog_stopping_in_order(
    fake_systemd: FakeSystemd, settings: Settings, tmp_path: Path
) -> None:
    config = tmp_path / "courier.toml"
    config.write_text(to_toml(settings.replace(role="api")))
    env = {
        "PATH": os.environ["PATH"],
        "NOTIFY_SOCKET": str(fake_systemd.path),
        "WATCHDOG_USEC": "200000",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "COURIER_HTTP_PORT": "0",
    }
    with subprocess.Popen(
        [sys.executable, "-m", "service", "--config", str(config), "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    ) as process:
        try:
            deadline = time.monotonic() + 15
            while "READY" not in fake_systemd.sent_keys() and time.monotonic() < deadline:
                fake_systemd.collect(time.monotonic() + 0.1)
            # WATCHDOG_USEC=200000: a ping every 0.1 s; wait for a few, however slow they come.
            deadline = time.monotonic() + 15
            while fake_systemd.pings() < 3 and time.monotonic() < deadline:
                fake_systemd.collect(time.monotonic() + 0.1)
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=15)
            fake_systemd.collect(time.monotonic() + 0.2)
        finally:
            if process.poll() is None:
                process.kill()
        stderr = process.stderr.read().decode() if process.stderr else ""
    keys = fake_systemd.sent_keys()
    assert process.returncode == 0, stderr[-2000:]
    assert "READY" in keys, (fake_systemd.messages, stderr[-2000:])
    assert keys.index("WATCHDOG") < keys.index("READY") < keys.index("STOPPING")
    assert keys.count("WATCHDOG") >= 3
    statuses = [m["STATUS"] for m in fake_systemd.messages if "STATUS" in m]
    assert statuses[0] == "starting"
    assert any(s.startswith("ready: API on http://") for s in statuses)
    assert any(s.startswith("draining") for s in statuses)
