"""Circuit breaker per legacy target: stop calling a system that keeps failing, probe it later."""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import IntEnum

from .. import metrics


class CircuitState(IntEnum):
    """Exported as the gauge value: 0 closed, 1 open, 2 half-open."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    """Opens after ``failures`` consecutive transient failures, for ``cooldown_seconds``.

    After the cool-down one call is let through (half-open): success closes the circuit, a
    failure opens it again. Only transient failures count; a 4xx says nothing about health.
    """

    def __init__(
        self,
        name: str,
        failures: int,
        cooldown_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._threshold = failures
        self._cooldown = cooldown_seconds
        self._clock = clock
        self._consecutive = 0
        self._opened_at = 0.0
        self._probing = False
        self.state = CircuitState.CLOSED
        self._export()

    def allow(self) -> bool:
        """Whether a call may go out now (a half-open circuit lets exactly one through)."""
        if self.state is CircuitState.OPEN and self._clock() - self._opened_at >= self._cooldown:
            self._set(CircuitState.HALF_OPEN)
        if self.state is CircuitState.HALF_OPEN:
            if self._probing:
                return False
            self._probing = True
        return self.state is not CircuitState.OPEN

    def retry_after(self) -> float:
        """Seconds until the circuit will let a probe through (0 when closed)."""
        if self.state is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self._cooldown - (self._clock() - self._opened_at))

    def record_success(self) -> None:
        """A call succeeded (or failed permanently, which proves the target is up)."""
        self._consecutive = 0
        self._probing = False
        if self.state is not CircuitState.CLOSED:
            self._set(CircuitState.CLOSED)

    def abandon(self) -> None:
        """A call let through ended with no news of the target's health (cancelled, no secret).

        Without this a half-open circuit whose probe never answered would refuse every call
        for good: the probe slot is given back so the next call can probe instead.
        """
        self._probing = False

    def record_failure(self) -> None:
        """A call failed transiently."""
        self._consecutive += 1
        self._probing = False
        if self.state is CircuitState.HALF_OPEN or self._consecutive >= self._threshold:
            self._opened_at = self._clock()
            if self.state is not CircuitState.OPEN:
                self._set(CircuitState.OPEN)

    def _set(self, state: CircuitState) -> None:
        if state is CircuitState.OPEN:
            metrics.circuit_transitions.labels(self.name, "open").inc()
        elif state is CircuitState.CLOSED:
            metrics.circuit_transitions.labels(self.name, "closed").inc()
        self.state = state
        self._export()

    def _export(self) -> None:
        metrics.circuit_state.labels(self.name).set(int(self.state))
        metrics.circuit_open.labels(self.name).set(1 if self.state is CircuitState.OPEN else 0)
