"""Liveness and readiness: what /healthz and /readyz report, and what systemd's READY=1 waits for.

Readiness = required secrets loaded, AWS reachable, not draining. The AWS probe is cached
for a few seconds so load-balancer health checks from many nodes cost a handful of requests
a minute, not one per check.

The report holds verdicts only ("ok" / "failing"). Why a probe fails goes to the log, never
into the report: an AWS error names the instance role's ARN, the account and the resources
it was refused, and /readyz answers anyone who reaches the port.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from . import metrics

log = logging.getLogger("courier.health")

Probe = Callable[[], Awaitable[None]]
OK = "ok"
FAILING = "failing"


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
        """(ready, {check: "ok" | "failing"}) with the draining flag first; no error text."""
        results: dict[str, str] = {"draining": FAILING if self.draining else OK}
        for name, check in self.checks.items():
            results[name] = OK if check() else FAILING
        errors = await asyncio.gather(*(self._probe(n, p) for n, p in self.probes.items()))
        for name, error in zip(self.probes, errors, strict=True):
            results[name] = OK if error is None else FAILING
        ready = all(value == OK for value in results.values())
        metrics.ready.set(1 if ready else 0)
        return ready, results

    async def _probe(self, name: str, probe: Probe) -> str | None:
        """The probe's error text (None = passed), from the cache while it is recent."""
        now = time.monotonic()
        cached = self._probe_results.get(name)
        if cached and now - cached[0] < self.probe_interval_seconds:
            return cached[1]
        try:
            await asyncio.wait_for(probe(), timeout=self.probe_interval_seconds)
            error = None
        except Exception as exc:  # any failure means "not ready"; the reason goes to the log
            error = f"{type(exc).__name__}: {exc}"[:500]
        self._probe_results[name] = (now, error)
        _log_change(name, cached[1] if cached else None, error)
        return error


def _log_change(name: str, previous: str | None, error: str | None) -> None:
    # Once per change, not once per health check: a lasting failure is one line, not one
    # every probe interval on every instance.
    if error == previous:
        return
    if error is not None:
        fields = {"event": "readiness_probe_failed", "check": name, "error": error}
        log.warning("readiness probe %s failing", name, extra={"fields": fields})
    else:
        fields = {"event": "readiness_probe_recovered", "check": name}
        log.info("readiness probe %s ok again", name, extra={"fields": fields})
