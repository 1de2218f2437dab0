"""SingleFlight, the one coalescing helper behind KMS data keys and the secret cache."""

from __future__ import annotations

import asyncio

import pytest

from service.singleflight import SingleFlight


async def test_concurrent_callers_of_one_key_share_one_call() -> None:
    calls = 0
    gate = asyncio.Event()

    async def fetch() -> str:
        nonlocal calls
        calls += 1
        await gate.wait()
        return "value"

    flight: SingleFlight[str, str] = SingleFlight()
    waiters = [asyncio.create_task(flight.run("k", fetch)) for _ in range(5)]
    other = asyncio.create_task(flight.run("other", fetch))
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*waiters, other) == ["value"] * 6
    assert calls == 2  # one per key


async def test_an_error_is_shared_then_forgotten() -> None:
    attempts = 0

    async def flaky() -> int:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0.01)
        if attempts == 1:
            raise RuntimeError("store down")
        return attempts

    flight: SingleFlight[str, int] = SingleFlight()
    first = await asyncio.gather(
        *(flight.run("k", flaky) for _ in range(3)), return_exceptions=True
    )
    assert [type(result) for result in first] == [RuntimeError] * 3
    assert await flight.run("k", flaky) == 2  # the failure was not kept


async def test_a_cancelled_waiter_does_not_cancel_the_call_others_wait_on() -> None:
    gate = asyncio.Event()

    async def slow() -> str:
        await gate.wait()
        return "done"

    flight: SingleFlight[str, str] = SingleFlight()
    impatient = asyncio.create_task(flight.run("k", slow))
    patient = asyncio.create_task(flight.run("k", slow))
    await asyncio.sleep(0)
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    gate.set()
    assert await patient == "done"


async def test_cancel_all_ends_every_call_in_flight() -> None:
    async def forever() -> None:
        await asyncio.Event().wait()

    flight: SingleFlight[str, None] = SingleFlight()
    task = flight.start("k", forever)
    assert flight.running("k")
    await flight.cancel_all()
    assert task.cancelled()
    assert not flight.running("k")
