"""courier itself as a child process: ``python -m service --config <toml> run``.

``courier_process(settings)`` writes ``settings`` as the TOML file ``--config`` reads, starts
courier in a process group of its own, waits for its "listening" log line (the URL it serves:
the API port, or a worker's health port; port 0 is read back from there) and, by default, for
``/readyz`` to answer 200; it yields a ``CourierProcess`` and stops courier on exit (SIGTERM,
then SIGKILL after ``stop_timeout``).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from service.settings import to_toml

from .processes import START_TIMEOUT_SECONDS, ManagedProcess, python_env, wait_http
from .sampling import ProcessSampler

LISTENING = r'"event": "listening", "url": "(http://[^"]+)"'


def _to_toml(settings: Any) -> str:
    from service.settings import to_toml

    text: str = to_toml(settings)
    return text


def courier_config(settings: Any, directory: Path, name: str = "courier.toml") -> Path:
    """Write ``settings`` (``service.settings.Settings``) as the TOML file ``--config`` reads."""
    path = directory / name
    path.write_text(to_toml(settings))
    return path


@dataclass(frozen=True)
class CourierProcess(ProcessSampler):
    """A running ``courier run``: its URL, process (pid, CPU, memory, signals) and logs."""

    url: str
    process: ManagedProcess
    config_path: Path

    def log(self) -> str:
        """What courier logged so far (JSON lines, on stderr)."""
        return self.process.stderr()

    async def wait_ready(self, timeout: float = 15) -> None:  # noqa: ASYNC109
        """Until ``/readyz`` answers 200 (``HarnessError`` if courier exits first)."""
        await wait_http(self.url + "/readyz", timeout=timeout, process=self.process)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to courier (SIGSTOP/SIGCONT pause and resume it)."""
        self.process.signal(signum)

    async def signal_and_wait(self, signum: int, timeout: float = 15) -> int:  # noqa: ASYNC109
        """Send ``signum``; the exit status once courier has ended (negative: a signal)."""
        self.process.signal(signum)
        return await self.process.wait(timeout)

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics: (sample name, sorted label pairs) -> value."""
        from prometheus_client.parser import text_string_to_metric_families

        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session,
            session.get(self.url + "/metrics") as response,
        ):
            text = await response.text()
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    async def aws_requests(self) -> dict[str, dict[str, int]]:
        """courier_aws_requests_total as {service: {operation: count}}."""
        found: dict[str, dict[str, int]] = {}
        for (name, labels), value in (await self.metrics()).items():
            if name == "courier_aws_requests_total":
                label = dict(labels)
                found.setdefault(label["service"], {})[label["operation"]] = int(value)
        return found


@contextlib.asynccontextmanager
async def courier_process(
    settings: Any,
    *,
    env: Mapping[str, str] | None = None,
    name: str = "courier",
    args: Sequence[str] = (),
    directory: Path | None = None,
    wait_ready: bool = True,
    ready_timeout: float = START_TIMEOUT_SECONDS,
    stop_timeout: float = 30.0,
    fake_aws: bool = True,
) -> AsyncIterator[CourierProcess]:
    """``python -m service --config <settings as TOML> run <args>``; waits for /readyz (200).

    ``env`` adds variables (``COURIER_*`` overrides win over the file); ``fake_aws`` gives it
    the kit's fake AWS credentials (``processes.FAKE_AWS_ENV``) rather than this process's.
    ``directory`` keeps the config and the output (default: a new temporary directory).
    """
    directory = directory or Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    config = courier_config(settings, directory, f"{name}.toml")
    argv = [sys.executable, "-m", "service", "--config", str(config), "run", *args]
    child_env = python_env(env, fake_aws=fake_aws)
    process = ManagedProcess(argv, name=name, env=child_env, directory=directory)
    try:
        found = await process.wait_for_output(LISTENING, ready_timeout, stream="stderr")
        handle = CourierProcess(found[1], process, config)
        if wait_ready:
            await handle.wait_ready(ready_timeout)
        yield handle
    finally:
        await process.stop(stop_timeout)
