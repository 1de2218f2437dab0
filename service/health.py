"""Liveness and readiness: what /healthz and /readyz report, and what systemd's READY=1 waits for.

Readiness = required secrets loaded, AWS reachable, not draining. The AWS probe is cached
for a few seconds so load-balancer health checks from many nodes cost a handful of requests
a minute, not one per check.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from . import metrics

Probe = Callable[[], Awaitable[None]]


@dataclass
class Readiness:
    """Aggregates the checks that make this process fit to receive traffic."""

    probe_interval_seconds: float = 5.0
    draining: bool = False
    checks: dict[str, Callable[[], bool]] = field(default_factory=dict)
    probes: dict[str, Probe] = field(default_factory=dict)
    _probe_results: dict[str, tuple[float, str | None]] = field(default_factory=dict)

    def add_check(self, name: str, check: Callable[[], bool]) -> None:
        """A cheap synchronous condition, evaluated on every /readyz."""
        self.checks[name] = check

    def add_probe(self, name: str, probe: Probe) -> None:
        """An I/O check (e.g. an AWS call), run at most once per ``probe_interval_seconds``."""
        self.probes[name] = probe

    async def report(self) -> tuple[bool, dict[str, str]]:
        """(ready, {check: "ok" | reason}) with the draining flag first."""
        results: dict[str, str] = {"draining": "draining" if self.draining else "ok"}
        for name, check in self.checks.items():
            results[name] = "ok" if check() else "not ready"
        outcomes = await asyncio.gather(*(self._probe(n, p) for n, p in self.probes.items()))
        results.update(zip(self.probes, outcomes, strict=True))
        ready = all(value == "ok" for value in results.values())
        metrics.ready.set(1 if ready else 0)
        return ready, results

    async def _probe(self, name: str, probe: Probe) -> str:
        now = time.monotonic()
        cached = self._probe_results.get(name)
        if cached and now - cached[0] < self.probe_interval_seconds:
            return cached[1] or "ok"
        try:
            await asyncio.wait_for(probe(), timeout=self.probe_interval_seconds)
            error = None
        except Exception as exc:  # any failure means "not ready"; the reason is reported
            error = f"{type(exc).__name__}: {exc}"[:200]
        self._probe_results[name] = (now, error)
        return error or "ok"
