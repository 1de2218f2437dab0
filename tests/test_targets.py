"""TargetClient against a real aiohttp stub: keys, auth, timeouts, retries, breaker, concurrency."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from service.errors import (
    CircuitOpenError,
    TargetHttpError,
    TargetMisconfiguredError,
    TargetPausedError,
    TransientError,
    is_retryable,
)
from service.secrets.errors import SecretError, SecretNotFoundError, SecretUnavailableError
from service.settings import TargetSettings
from service.stubs import LegacyStub
from service.worker.circuit import CircuitState
from service.worker.limiter import INITIAL_LIMIT
from service.worker.targets import (
    NO_SHARE_RETRY_SECONDS,
    Delivery,
    TargetClient,
    parse_retry_after,
)
from tests.chain import eventually

TRACEPARENT = "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01"


@dataclass
class CountingStub(LegacyStub):
    """A legacy stub that also records the most calls it served at once."""

    active: int = 0
    peak: int = 0

    async def _deliver(self, request: web.Request) -> web.Response:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            return await super()._deliver(request)
        finally:
            self.active -= 1


class Secrets:
    """A secret getter that records what it was asked and can be made to fail."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.asked: list[str] = []
        self.failing = False

    async def __call__(self, name: str) -> str:
        self.asked.append(name)
        if self.failing:
            raise SecretUnavailableError(f"secret {name!r} unavailable")
        return self.values[name]


@pytest.fixture
async def stub() -> AsyncIterator[CountingStub]:
    server = CountingStub(name="crm", token="")
    async with server.serving():
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def client(
    stub: LegacyStub,
    session: aiohttp.ClientSession,
    secrets: Secrets | None = None,
    **overrides: Any,
) -> TargetClient:
    settings = TargetSettings(
        **{
            "name": "crm",
            "url": f"{stub.url}/api/mailboxes",
            "timeout_seconds": 2.0,
            "retries": 0,
            **overrides,
        }
    )
    return TargetClient(settings, session, secrets or Secrets({}))


def delivery(request_id: str = "req-1") -> Delivery:
    return Delivery(request_id, b'{"hello":"world"}', "application/json", TRACEPARENT)


def calls(target: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "courier_target_calls_total", {"target": target, "outcome": outcome}
    )
    return value or 0.0


async def test_call_carries_idempotency_key_body_and_trace(
    stub: CountingStub, session: aiohttp.ClientSession
) -> None:
    secrets = Secrets({})
    await client(stub, session, secrets).deliver(delivery("req-1"))
    [call] = stub.calls
    assert call.path == "/api/mailboxes"
    assert call.idempotency_key == "req-1:crm"
    assert call.headers["Content-Type"] == "application/json"
    assert call.headers["traceparent"] == TRACEPARENT
    assert "Authorization" not in call.headers
    assert call.body == b'{"hello":"world"}'
    assert stub.effects == {"req-1:crm": 1}
    assert secrets.asked == []  # no secret configured: none read


async def test_authorization_comes_from_the_secret(
    stub: CountingStub, session: aiohttp.ClientSession
) -> None:
    stub.token = "s3cret-token"
    secrets = Secrets({"courier.crm.token": "s3cret-token"})
    target = client(stub, session, secrets, secret="courier.crm.token")
    await target.deliver(delivery("req-auth"))
    assert stub.calls[0].headers["Authorization"] == "Bearer s3cret-token"
    assert stub.effects == {"req-auth:crm": 1}
    assert secrets.asked == ["courier.crm.token"]


async def test_wrong_secret_is_a_permanent_rejection(
    stub: CountingStub, session: aiohttp.ClientSession
) -> None:
    stub.token = "expected"
    target = client(stub, session, Secrets({"tok": "other"}), secret="tok", retries=2)
    with pytest.raises(TargetHttpError) as caught:
        await target.deliver(delivery())
    assert caught.value.status == 401
    assert not is_retryable(caught.value)
    assert len(stub.calls) == 1


async def test_timeout_is_transient(stub: CountingStub, session: aiohttp.ClientSession) -> None:
    stub.behaviour.latency_seconds = 0.5
    before = calls("crm", "timeout")
    target = client(stub, session, timeout_seconds=0.1)
    with pytest.raises(TransientError):
        await target.deliver(delivery())
    assert calls("crm", "timeout") == before + 1


async def test_503_is_retried_retries_times_then_raised(
    stub: CountingStub, session: aiohttp.ClientSession
) -> None:
    stub.behaviour.fixed_status = 503
    target = client(stub, session, retries=2, breaker_failures=10)
    with pytest.raises(TargetHttpError) as caught:
        await target.deliver(delivery())
    assert caught.value.status == 503
    assert is_retryable(caught.value)
    assert len(stub.calls) == 3
    assert {call.idempotency_key for call in stub.calls} == {"req-1:crm"}


async def test_a_retry_that_succeeds_delivers_once(
    stub: CountingStub, session: aiohttp.ClientSession
) -> None:
    stub.behaviour.fixed_status = 503
    target = client(stub, session, retries=3)
    task = asyncio.create_task(target.deliver(delivery()))
    while not stub.calls:
        await asyncio.sleep(0.01)
    stub.behaviour.fixed_status = 0
    await task
    assert stub.effects == {"req-1:crm": 1}
    assert len(stub.calls) == 2


async def test_400_is_not_retried_and_does_not_trip_the_breaker(
    stub: CountingStub, session: aiohttp.ClientSession
) -> None:
    stub.behaviour.fixed_status = 400
    target = client(stub, session, retries=3, breaker_failures=1)
    for _ in range(3):
        with pytest.raises(TargetHttpError) as caught:
            await target.deliver(delivery())
        assert caught.value.status == 400
        assert not is_retryable(caught.value)
    assert len(stub.calls) == 3  # one per delivery: never retried
    assert target.breaker.state is CircuitState.CLOSED


async def test_transient_failures_open_the_circuit_and_stop_calling(
    stub: CountingStub, session: aiohttp.ClientSession
) -> None:
    stub.behaviour.down = True
    target = client(stub, session, breaker_failures=2, breaker_cooldown_seconds=60)
    for _ in range(2):
        with pytest.raises(TargetHttpError):
            await target.deliver(delivery())
    with pytest.raises(CircuitOpenError) as caught:
        await target.deliver(delivery())
    assert 0 < caught.value.retry_after <= 60
    assert len(stub.calls) == 2
    assert REGISTRY.get_sample_value("courier_target_circuit_open", {"target": "crm"}) == 1


async def test_half_open_probe_without_a_secret_does_not_wedge_the_circuit(
    stub: CountingStub, session: aiohttp.ClientSession
) -> None:
    stub.token = "tok"
    secrets = Secrets({"crm.token": "tok"})
    target = client(
        stub, session, secrets, secret="crm.token", breaker_failures=1, breaker_cooldown_seconds=0.1
    )
    stub.behaviour.down = True
    with pytest.raises(TargetHttpError):
        await target.deliver(delivery())
    stub.behaviour.down = False
    await asyncio.sleep(0.15)
    secrets.failing = True  # the probe ends before reaching the target
    with pytest.raises(SecretUnavailableError):
        await target.deliver(delivery())
    secrets.failing = False
    await target.deliver(delivery())  # the next call may probe: the circuit is not stuck
    assert target.breaker.state is CircuitState.CLOSED
    assert stub.effects == {"req-1:crm": 1}


async def test_concurrency_limit_is_respected(
    stub: CountingStub, session: aiohttp.ClientSession
) -> None:
    # Long enough that the second call arrives while the first is held, even on a busy machine.
    stub.behaviour.latency_seconds = 0.5
    target = client(stub, session, concurrency=2)
    await asyncio.gather(*(target.deliver(delivery(f"req-{i}")) for i in range(6)))
    assert stub.peak == 2
    assert len(stub.effects) == 6


class RefusingSecrets(Secrets):
    """A secret getter whose store refuses the secret for good."""

    def __init__(self, error: Exception) -> None:
        super().__init__({})
        self.error = error

    async def __call__(self, name: str) -> str:
        self.asked.append(name)
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        SecretNotFoundError("secret 'courier.crm.token' not found in table 'credential-store'"),
        # What real AWS answers when the policy's LeadingKeys or encryption-context
        # conditions do not allow the secret: credstash.py wraps it as a plain SecretError.
        SecretError("secret 'courier.crm.token': secret store failed (AccessDeniedException)"),
    ],
    ids=["missing", "refused-by-iam"],
)
async def test_missing_secret_is_a_transient_misconfiguration_and_calls_nothing(
    stub: CountingStub, session: aiohttp.ClientSession, error: Exception
) -> None:
    secrets = RefusingSecrets(error)
    target = client(stub, session, secrets, secret="courier.crm.token", retries=2)
    before = calls("crm", "misconfigured")
    with pytest.raises(TargetMisconfiguredError) as caught:
        await target.deliver(delivery())
    # Not the message's fault: retried later (with backoff), never dead-lettered as poison.
    assert is_retryable(caught.value)
    assert caught.value.reason == "target_misconfigured"
    assert "courier.crm.token" in str(caught.value)
    assert stub.calls == []  # the target was never called
    assert secrets.asked == ["courier.crm.token"]  # no immediate retries: they cannot help
    assert calls("crm", "misconfigured") == before + 1
    assert target.breaker.state is CircuitState.CLOSED  # the target itself is fine


# --- Retry-After and the adaptive limit --------------------------------------------------------


async def test_a_429_without_retry_after_is_retried_as_before(
    stub: CountingStub, session: aiohttp.ClientSession
) -> None:
    stub.behaviour.fixed_status = 429
    target = client(stub, session, retries=1)
    with pytest.raises(TargetHttpError) as refused:
        await target.deliver(delivery())
    assert refused.value.retry_after is None
    assert len(stub.calls) == 2  # one immediate retry, no pause
    assert target.paused_for() == 0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5", 5.0),
        (" 0 ", 0.0),
        ("Thu, 03 Dec 2026 12:00:07 GMT", 7.0),
        ("Thu, 03 Dec 2026 11:59:00 GMT", 0.0),  # already past: no wait
        ("Thu Dec  3 12:00:07 2026", 7.0),  # the obsolete asctime form: GMT too
        ("-1", None),
        ("²", None),  # str.isdigit() says yes; float() says no
        ("1.5", None),  # delay-seconds are whole (RFC 9110)
        ("soon", None),
        ("", None),
    ],
)
def test_retry_after_values(value: str, seconds: float | None) -> None:
    now = datetime.datetime(2026, 12, 3, 12, 0, 0, tzinfo=datetime.UTC).timestamp()
    assert parse_retry_after(value, now) == seconds


async def test_the_limit_grows_on_quick_answers_and_falls_on_overload(
    stub: CountingStub, session: aiohttp.ClientSession
) -> None:
    stub.behaviour.latency_seconds = 0.05
    # A breaker that stays closed: an open one would stop the calls that carry the signal.
    target = client(stub, session, concurrency_min=1, concurrency=16, breaker_failures=1000)
    assert target.limiter.limit == INITIAL_LIMIT  # it starts low
    await asyncio.gather(*(target.deliver(delivery(f"req-{i}")) for i in range(60)))
    grown = target.limiter.limit
    assert grown > INITIAL_LIMIT
    assert stub.peak <= grown
    stub.behaviour.fixed_status = 503  # overloaded, and saying nothing about when to return
    for _ in range(4):
        await asyncio.gather(
            *(target.deliver(delivery(f"more-{i}")) for i in range(grown)), return_exceptions=True
        )
        await asyncio.sleep(target.limiter.min_rtt)
    assert target.limiter.limit < grown


async def _clear_after(stub: CountingStub, seconds: float) -> None:
    await asyncio.sleep(seconds)
    stub.behaviour.fixed_status = 0


async def test_retry_after_holds_every_call_to_the_target_for_that_long(
    stub: CountingStub, session: aiohttp.ClientSession
) -> None:
    stub.behaviour.fixed_status = 429
    stub.behaviour.retry_after_seconds = 1
    target = client(stub, session, retries=0)
    first = asyncio.create_task(target.deliver(delivery("req-1")))
    await eventually(lambda: target.paused_for() > 0, 5, "the pause")
    stub.behaviour.fixed_status = 0  # the target recovers within its own Retry-After
    second = asyncio.create_task(target.deliver(delivery("req-2")))  # during the pause
    await asyncio.sleep(0.2)
    assert len(stub.calls) == 1  # nothing was sent during the pause...
    assert target.constrained  # ...and scaling out must not follow this backlog
    assert REGISTRY.get_sample_value("courier_target_paused", {"target": "crm"}) == 1
    await asyncio.wait_for(asyncio.gather(first, second), 5)  # held here, not sent back
    assert stub.effects == {"req-1:crm": 1, "req-2:crm": 1}
    refused_at = stub.calls[0].at
    assert all(call.at - refused_at >= 0.9 for call in stub.calls[1:])
    assert REGISTRY.get_sample_value("courier_target_paused", {"target": "crm"}) == 0


async def test_a_call_waiting_for_a_slot_when_a_pause_begins_waits_out_the_pause(
    stub: CountingStub, session: aiohttp.ClientSession
) -> None:
    stub.behaviour.latency_seconds = 0.3
    stub.behaviour.fixed_status = 503
    stub.behaviour.retry_after_seconds = 2
    target = client(stub, session, concurrency=1, limit="fixed")
    both = asyncio.gather(target.deliver(delivery("req-1")), target.deliver(delivery("req-2")))
    await eventually(lambda: target.paused_for() > 0, 5, "the pause")
    stub.behaviour.fixed_status = 0
    await asyncio.wait_for(both, 10)
    refused_at = stub.calls[0].at
    assert [call.idempotency_key for call in stub.calls[:1]] == ["req-1:crm"]
    assert all(call.at - refused_at >= 1.9 for call in stub.calls[1:])  # none in the pause
    assert stub.effects == {"req-1:crm": 1, "req-2:crm": 1}


async def test_a_pause_longer_than_the_hold_sends_the_message_back_with_its_length(
    stub: CountingStub, session: aiohttp.ClientSession
) -> None:
    stub.behaviour.fixed_status = 503
    stub.behaviour.retry_after_seconds = 3600
    target = client(stub, session, retry_after_max_seconds=60)  # 3600 is clamped to 60
    with pytest.raises(TargetHttpError) as refused:
        await target.deliver(delivery("req-1"))
    assert refused.value.retry_after == 60.0
    with pytest.raises(TargetPausedError) as paused:
        await target.deliver(delivery("req-2"))
    assert 55 < paused.value.retry_after <= 60
    assert len(stub.calls) == 1


async def test_answers_with_retry_after_never_open_the_circuit(
    stub: CountingStub, session: aiohttp.ClientSession
) -> None:
    stub.behaviour.fixed_status = 429
    stub.behaviour.retry_after_seconds = 1
    target = client(stub, session, breaker_failures=1, breaker_cooldown_seconds=60)
    clearing = asyncio.create_task(_clear_after(stub, 1.5))  # two 429s, then an answer
    await asyncio.wait_for(target.deliver(delivery()), 10)
    await clearing
    assert len(stub.calls) >= 2
    assert target.breaker.state is CircuitState.CLOSED  # the pauses held the calls, not 60 s


async def test_no_share_of_a_fleet_cap_holds_the_call_until_a_share_comes(
    stub: CountingStub, session: aiohttp.ClientSession
) -> None:
    target = client(stub, session, fleet_max_concurrency=2)
    target.limiter.set_cap(0)  # the others hold the whole cap for now
    delivering = asyncio.create_task(target.deliver(delivery()))
    await asyncio.sleep(1.5)
    assert stub.calls == []
    assert calls("crm", "no_share") >= 1
    target.limiter.set_cap(1)
    await asyncio.wait_for(delivering, 5)
    assert stub.effects == {"req-1:crm": 1}


async def test_no_share_for_longer_than_the_hold_sends_the_message_back(
    stub: CountingStub, session: aiohttp.ClientSession
) -> None:
    settings = TargetSettings(name="crm", url=f"{stub.url}/api", fleet_max_concurrency=2)
    target = TargetClient(settings, session, Secrets({}), hold_seconds=2)
    target.limiter.set_cap(0)
    with pytest.raises(TargetPausedError) as held:
        await asyncio.wait_for(target.deliver(delivery()), 10)
    assert held.value.retry_after == NO_SHARE_RETRY_SECONDS
    assert "no share of its fleet-wide cap" in str(held.value)
    assert stub.calls == []


async def test_fast_refusals_are_not_taken_for_the_unloaded_latency(
    stub: CountingStub, session: aiohttp.ClientSession
) -> None:
    stub.behaviour.latency_seconds = 0.05
    target = client(stub, session, concurrency=16)
    await asyncio.gather(*(target.deliver(delivery(f"req-{i}")) for i in range(60)))
    grown, unloaded = target.limiter.limit, target.limiter.min_rtt
    stub.behaviour.latency_seconds = 0
    stub.behaviour.fixed_status = 400  # refused in a millisecond, before any work
    for index in range(5):
        with pytest.raises(TargetHttpError):
            await target.deliver(delivery(f"bad-{index}"))
    assert target.limiter.min_rtt == unloaded
    stub.behaviour.latency_seconds = 0.05
    stub.behaviour.fixed_status = 0
    await asyncio.gather(*(target.deliver(delivery(f"more-{i}")) for i in range(grown)))
    assert target.limiter.limit >= grown - 1  # not cut to the floor by the refusals


@dataclass
class RetryAfterStub(LegacyStub):
    """Answers every call 503 with a fixed Retry-After header value."""

    retry_after: str = ""

    async def _deliver(self, request: web.Request) -> web.Response:
        await self.gate(request)
        return web.json_response({}, status=503, headers={"Retry-After": self.retry_after})


@pytest.mark.parametrize("value", ["0", "Thu, 01 Jan 2026 00:00:00 GMT"], ids=["zero", "past"])
async def test_a_retry_after_of_nothing_is_an_ordinary_retryable_answer(
    session: aiohttp.ClientSession, value: str
) -> None:
    stub = RetryAfterStub(name="crm", retry_after=value)
    async with stub.serving():
        target = client(stub, session, retries=2, breaker_failures=10)
        with pytest.raises(TargetHttpError) as refused:
            await asyncio.wait_for(target.deliver(delivery()), 5)
    assert refused.value.retry_after is None
    assert target.paused_for() == 0
    assert len(stub.calls) == 3  # the immediate retries, not a spin of pauses of nothing


async def test_an_open_circuit_stops_the_calls_waiting_for_a_slot(
    stub: CountingStub, session: aiohttp.ClientSession
) -> None:
    stub.behaviour.latency_seconds = 0.05
    stub.behaviour.fixed_status = 500
    target = client(stub, session, concurrency=2, limit="fixed", breaker_failures=3)
    results = await asyncio.gather(
        *(target.deliver(delivery(f"req-{i}")) for i in range(40)), return_exceptions=True
    )
    assert sum(isinstance(r, CircuitOpenError) for r in results) >= 30
    assert len(stub.calls) <= 3 + 2  # the failures that opened it, and calls already out
