"""Child processes for the kit's servers: each in a process group of its own, always stopped.

``ManagedProcess`` starts a child (stdout and stderr in files), ``managed()`` is it as an async
context manager, ``wait_http()`` polls a URL until it answers. A process killed from outside
(SIGKILL of the caller) leaves its children running; every group started here is also recorded,
and ``kill_all()`` (registered with ``atexit``) ends the ones still alive.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .ports import LOOPBACK
from .sampling import ProcessSampler

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
POLL_SECONDS = 0.02
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}

__all__ = [
    "FAKE_AWS_ENV",
    "LOOPBACK",
    "REPO",
    "HarnessError",
    "ManagedProcess",
    "Server",
    "kill_all",
    "managed",
    "python_env",
    "wait_for_stop_signal",
    "wait_http",
]

_live_groups: set[int] = set()


class HarnessError(RuntimeError):
    """A process did not start or answer in time; the message carries its stderr tail."""


def kill_all() -> None:
    """SIGKILL every process group this module started that is still alive."""
    for pgid in list(_live_groups):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        _live_groups.discard(pgid)


atexit.register(kill_all)


def track(pgid: int) -> None:
    """Have ``kill_all`` end process group ``pgid`` (a launcher this module did not run)."""
    _live_groups.add(pgid)


def untrack(pgid: int) -> None:
    """``pgid`` was stopped by whoever started it."""
    _live_groups.discard(pgid)


class ManagedProcess(ProcessSampler):
    """A child in a process group of its own, stdout and stderr kept in files for inspection."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str,
        env: Mapping[str, str] | None = None,
        cwd: Path = REPO,
        directory: Path | None = None,
    ) -> None:
        self.name = name
        self._dir = Path(directory or tempfile.mkdtemp(prefix=f"bench-{name}-"))
        self.stdout_path = self._dir / f"{name}.out"
        self.stderr_path = self._dir / f"{name}.err"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.popen = subprocess.Popen(  # noqa: S603 - argv is the kit's own
                list(argv),
                env=dict(os.environ if env is None else env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        track(self.popen.pid)
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int:
        """The child's pid (also its process group id)."""
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once it has ended (negative: the signal that ended it), else None."""
        return self.popen.poll()

    def alive(self) -> bool:
        """Whether the child still runs."""
        return self.popen.poll() is None

    def stdout(self) -> str:
        """What it wrote to stdout so far."""
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        """What it wrote to stderr so far."""
        return self.stderr_path.read_text(errors="replace")

    def describe_failure(self, what: str) -> HarnessError:
        """A ``HarnessError`` naming the process, its state and the tail of its stderr."""
        state = (
            f"exited with status {self.popen.returncode}" if not self.alive() else "still running"
        )
        tail = self.stderr()[-3000:].strip()
        return HarnessError(f"{self.name} {what} ({state})" + (f":\n{tail}" if tail else ""))

    async def wait_for_output(
        self,
        pattern: str,
        timeout: float = START_TIMEOUT_SECONDS,  # noqa: ASYNC109
        *,
        stream: str = "stdout",
    ) -> re.Match[str]:
        """The first match of ``pattern`` in the process's stdout (or stderr), waiting for it."""
        compiled = re.compile(pattern)
        path = self.stdout_path if stream == "stdout" else self.stderr_path
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = compiled.search(path.read_text(errors="replace"))
            if found:
                return found
            if not self.alive():
                break
            await asyncio.sleep(POLL_SECONDS)
        raise self.describe_failure(f"did not print {pattern!r} within {timeout:g}s")

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the whole group (SIGSTOP/SIGCONT pause and resume it)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)

    async def wait(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int:  # noqa: ASYNC109
        """The exit status once the child has ended; ``TimeoutError`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name} still runs after {timeout:g}s")
            await asyncio.sleep(POLL_SECONDS)
        return int(self.popen.returncode)

    async def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int:  # noqa: ASYNC109
        """SIGTERM the group, wait up to ``timeout``, then SIGKILL; returns the exit status."""
        if self.alive():
            self.signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            self.signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await self.wait(timeout)
        if self.alive():
            self.signal(signal.SIGKILL)
            while self.alive():  # noqa: ASYNC110
                await asyncio.sleep(POLL_SECONDS)
        else:  # the leader is gone; anything it left in its group goes too
            self.signal(signal.SIGKILL)
        untrack(self.pid)
        return int(self.popen.returncode or 0)


@contextlib.asynccontextmanager
async def managed(
    argv: Sequence[str], *, name: str, env: Mapping[str, str] | None = None
) -> AsyncIterator[ManagedProcess]:
    """``ManagedProcess`` as a context manager: stopped (group and all) on exit."""
    process = ManagedProcess(argv, name=name, env=env)
    try:
        yield process
    finally:
        await process.stop()


async def wait_http(
    url: str,
    *,
    timeout: float = START_TIMEOUT_SECONDS,  # noqa: ASYNC109
    process: ManagedProcess | None = None,
    ok: Sequence[int] = (200,),
    method: str = "GET",
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Poll ``url`` until it answers with a status in ``ok`` (fails early if ``process`` died)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            if process is not None and not process.alive():
                raise process.describe_failure(f"exited before {url} answered")
            try:
                async with session.request(method, url, data=data, headers=headers) as response:
                    await response.read()
                    if response.status in ok:
                        return
                    last = f"HTTP {response.status}"
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                last = type(exc).__name__
            await asyncio.sleep(POLL_SECONDS * 5)
    if process is not None:
        raise process.describe_failure(f"{url} did not answer {list(ok)} ({last})")
    raise HarnessError(f"{url} did not answer {list(ok)} within {timeout:g}s ({last})")


@dataclass(frozen=True)
class Server(ProcessSampler):
    """A running server: its base URL and process (``cpu_seconds``, ``memory``, ``signal``)."""

    name: str
    url: str
    process: Any  # ManagedProcess, or courier_testkit.fauxqs.FauxqsServer for fauxqs


def python_env(extra: Mapping[str, str] | None = None, *, fake_aws: bool = True) -> dict[str, str]:
    """The environment for a Python child: this one, the repo importable, no systemd socket.

    ``fake_aws`` (the default) sets the kit's fake AWS credentials over whatever this
    environment has; ``extra`` wins over both.
    """
    env = {**os.environ, **(FAKE_AWS_ENV if fake_aws else {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra or {})
    return env


async def wait_for_stop_signal() -> None:
    """Return on SIGTERM or SIGINT: how the kit's server processes (stubs, proxy) end."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
