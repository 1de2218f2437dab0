"""The per-target circuit breaker, on an injected clock."""

from __future__ import annotations

from prometheus_client import REGISTRY

from service.worker.circuit import CircuitBreaker, CircuitState


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gauge(name: str, target: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"target": target})


def transitions(target: str, state: str) -> float:
    value = REGISTRY.get_sample_value(
        "courier_target_circuit_transitions_total", {"target": target, "state": state}
    )
    return value or 0.0


def breaker(name: str, clock: Clock, failures: int = 3, cooldown: float = 10.0) -> CircuitBreaker:
    return CircuitBreaker(name, failures, cooldown, clock=clock)


def test_starts_closed_and_exported_as_closed() -> None:
    circuit = breaker("cb-start", Clock())
    assert circuit.state is CircuitState.CLOSED
    assert circuit.allow()
    assert circuit.retry_after() == 0.0
    assert gauge("courier_target_circuit_open", "cb-start") == 0
    assert gauge("courier_target_circuit_state", "cb-start") == 0


def test_opens_after_consecutive_failures_only() -> None:
    clock = Clock()
    circuit = breaker("cb-open", clock, failures=3)
    circuit.record_failure()
    circuit.record_failure()
    circuit.record_success()  # resets the run of failures
    circuit.record_failure()
    circuit.record_failure()
    assert circuit.state is CircuitState.CLOSED
    assert circuit.allow()
    circuit.record_failure()
    assert circuit.state is CircuitState.OPEN
    assert not circuit.allow()
    assert gauge("courier_target_circuit_open", "cb-open") == 1
    assert gauge("courier_target_circuit_state", "cb-open") == 1
    assert transitions("cb-open", "open") == 1


def test_open_circuit_refuses_until_the_cooldown_then_lets_one_probe() -> None:
    clock = Clock()
    circuit = breaker("cb-probe", clock, failures=1, cooldown=10)
    circuit.record_failure()
    clock.now += 4
    assert not circuit.allow()
    assert circuit.retry_after() == 6
    clock.now += 6
    assert circuit.allow()  # the probe
    assert circuit.state is CircuitState.HALF_OPEN
    assert gauge("courier_target_circuit_state", "cb-probe") == 2
    assert gauge("courier_target_circuit_open", "cb-probe") == 0
    assert not circuit.allow()  # only one probe at a time
    assert circuit.retry_after() == 0.0


def test_successful_probe_closes() -> None:
    clock = Clock()
    circuit = breaker("cb-close", clock, failures=1, cooldown=5)
    circuit.record_failure()
    clock.now += 5
    assert circuit.allow()
    circuit.record_success()
    assert circuit.state is CircuitState.CLOSED
    assert circuit.allow()
    assert circuit.allow()
    assert gauge("courier_target_circuit_open", "cb-close") == 0
    assert transitions("cb-close", "closed") == 1


def test_failed_probe_reopens_for_a_whole_cooldown() -> None:
    clock = Clock()
    circuit = breaker("cb-reopen", clock, failures=2, cooldown=5)
    circuit.record_failure()
    circuit.record_failure()
    clock.now += 5
    assert circuit.allow()
    clock.now += 1
    circuit.record_failure()  # one failure is enough while half-open
    assert circuit.state is CircuitState.OPEN
    assert circuit.retry_after() == 5
    assert not circuit.allow()
    clock.now += 5
    assert circuit.allow()
    assert transitions("cb-reopen", "open") == 2


def test_abandoned_probe_lets_the_next_call_probe() -> None:
    clock = Clock()
    circuit = breaker("cb-abandon", clock, failures=1, cooldown=1)
    circuit.record_failure()
    clock.now += 1
    assert circuit.allow()
    circuit.abandon()  # the probe never reached the target (cancelled, secret missing)
    assert circuit.state is CircuitState.HALF_OPEN
    assert circuit.allow()
    assert not circuit.allow()
