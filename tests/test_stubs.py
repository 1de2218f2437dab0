"""The stubs' model of a legacy system with real capacity (``service.stubs.base``).

``capacity`` K calls are served at once, ``queue`` Q more wait FIFO for a slot, and beyond
K + Q a call is refused at once with ``overload_status`` (and ``Retry-After`` when
``retry_after_seconds`` > 0). Every call is on the timeline (``GET /_stub/timeline``). Each
test runs a real aiohttp server and calls it over HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from courier_testkit.stubs import DEFAULT_BEHAVIOUR, stub_process
from service.stubs import LegacyStub

LATENCY = 0.2


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(http: aiohttp.ClientSession, url: str, key: str) -> tuple[int, str | None, float]:
    """(status, Retry-After header, seconds until the answer) of one delivery."""
    started = time.monotonic()
    async with http.post(
        url, json={"mailbox": {"username": key}}, headers={"Idempotency-Key": key}
    ) as reply:
        await reply.read()
        return reply.status, reply.headers.get("Retry-After"), time.monotonic() - started


async def burst(
    http: aiohttp.ClientSession, url: str, count: int
) -> list[tuple[int, str | None, float]]:
    """``count`` calls at once, each on a connection of its own."""
    return list(await asyncio.gather(*(call(http, url, f"r{i}:crm") for i in range(count))))


async def timeline(http: aiohttp.ClientSession, url: str, since: float | None = None) -> list[Any]:
    params = {} if since is None else {"since": str(since)}
    async with http.get(url + "/_stub/timeline", params=params) as reply:
        assert reply.status == 200
        entries: list[Any] = (await reply.json())["timeline"]
        return entries


async def stats(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url + "/_stub/stats") as reply:
        document: dict[str, Any] = await reply.json()
        return document


async def test_calls_beyond_capacity_wait_in_the_queue_and_beyond_it_are_refused(
    http: aiohttp.ClientSession,
) -> None:
    stub = LegacyStub(name="crm")
    stub.behaviour.update(
        {"latency_seconds": LATENCY, "capacity": 2, "queue": 2, "retry_after_seconds": 0.4}
    )
    async with stub.serving() as url:
        answers = await burst(http, url + "/crm", 6)
        entries = await timeline(http, url)
        counts = await stats(http, url)
    served = sorted(seconds for status, _, seconds in answers if status == 200)
    refused = [(status, after, seconds) for status, after, seconds in answers if status != 200]
    assert len(served) == 4
    # Two were served at once, two waited a whole service time for a slot first.
    assert served[1] < 2 * LATENCY <= served[2]
    # Refused at once (not after the latency), with Retry-After in whole seconds, rounded up.
    assert [(status, after) for status, after, _ in refused] == [(503, "1"), (503, "1")]
    assert max(seconds for _, _, seconds in refused) < served[0]
    assert counts["peak_concurrent"] == 4
    assert counts["refused"] == 2
    assert (counts["calls"], counts["effects"]) == (6, 4)
    assert sorted(status for _, _, status, _, _ in entries) == [200, 200, 200, 200, 503, 503]
    waited = sorted(entry[3] for entry in entries if entry[2] == 200)
    assert waited[:2] == [0.0, 0.0]
    assert all(w >= LATENCY * 0.9 for w in waited[2:])
    for arrival, end, _, wait, path in entries:
        assert arrival <= end <= time.monotonic()
        assert end - arrival >= wait
        assert path == "/crm"


async def test_capacity_alone_still_refuses_at_once_without_retry_after(
    http: aiohttp.ClientSession,
) -> None:
    stub = LegacyStub(name="crm")
    stub.behaviour.update({"latency_seconds": LATENCY, "capacity": 1})
    async with stub.serving() as url:
        answers = await burst(http, url + "/crm", 3)
        counts = await stats(http, url)
    assert sorted((status, after) for status, after, _ in answers) == [
        (200, None),
        (503, None),
        (503, None),
    ]
    assert counts["peak_concurrent"] == 1
    assert counts["refused"] == 2


async def test_the_overload_answer_may_be_429(http: aiohttp.ClientSession) -> None:
    stub = LegacyStub(name="crm")
    stub.behaviour.update(
        {
            "latency_seconds": LATENCY,
            "capacity": 1,
            "overload_status": 429,
            "retry_after_seconds": 2,
        }
    )
    async with stub.serving() as url:
        answers = await burst(http, url + "/crm", 2)
    assert sorted((status, after) for status, after, _ in answers) == [(200, None), (429, "2")]


async def test_a_fixed_status_carries_retry_after_when_set(http: aiohttp.ClientSession) -> None:
    stub = LegacyStub(name="crm")
    async with stub.serving() as url:
        async with http.post(url + "/_stub/behaviour", json={"fixed_status": 429}) as reply:
            assert reply.status == 200
        assert (await call(http, url + "/crm", "r1:crm"))[:2] == (429, None)
        async with http.post(url + "/_stub/behaviour", json={"retry_after_seconds": 5}) as reply:
            assert (await reply.json())["retry_after_seconds"] == 5
        assert (await call(http, url + "/crm", "r2:crm"))[:2] == (429, "5")
        async with http.post(url + "/_stub/behaviour", json={"fixed_status": 0}) as reply:
            assert reply.status == 200
        assert (await call(http, url + "/crm", "r3:crm"))[:2] == (200, None)
        statuses = [entry[2] for entry in await timeline(http, url)]
    assert statuses == [429, 429, 200]
    assert stub.refused == 0  # a configured answer is not an overload


async def test_raising_capacity_at_run_time_serves_the_queue_at_once(
    http: aiohttp.ClientSession,
) -> None:
    """The queue waits for a slot; a larger capacity set over HTTP admits it without waiting for
    the calls in service to end."""
    stub = LegacyStub(name="crm")
    stub.behaviour.update({"latency_seconds": 1.0, "capacity": 1, "queue": 2})
    async with stub.serving() as url:
        calls = asyncio.create_task(burst(http, url + "/crm", 3))
        deadline = time.monotonic() + 5
        while len(stub.calls) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert (await stats(http, url))["waiting"] == 2
        async with http.post(url + "/_stub/behaviour", json={"capacity": 3}) as reply:
            assert reply.status == 200
        answers = await calls
    assert [status for status, _, _ in answers] == [200, 200, 200]
    assert max(seconds for _, _, seconds in answers) < 1.9  # not 3 x 1 s in a row


async def test_timeline_since_and_reset(http: aiohttp.ClientSession) -> None:
    stub = LegacyStub(name="crm")
    stub.behaviour.update({"capacity": 1, "latency_seconds": LATENCY})
    async with stub.serving() as url:
        await burst(http, url + "/crm", 2)
        (first_end,) = {entry[1] for entry in await timeline(http, url) if entry[2] == 200}
        await call(http, url + "/crm", "r9:crm")
        newer = await timeline(http, url, since=first_end)
        assert [entry[2] for entry in newer] == [200]
        assert newer[0][1] > first_end
        async with http.post(url + "/_stub/reset") as reply:
            assert reply.status == 200
        assert await timeline(http, url) == []
        counts = await stats(http, url)
    assert (counts["calls"], counts["refused"], counts["peak_concurrent"]) == (0, 0, 0)


async def test_the_stub_process_serves_the_timeline_and_restores_the_new_knobs() -> None:
    async with stub_process({"crm": LATENCY}, restore_behaviour=True) as stubs:
        await stubs.behave("crm", capacity=1, queue=1, retry_after_seconds=3)
        async with aiohttp.ClientSession() as http:
            answers = await burst(http, stubs.urls["crm"] + "/crm", 3)
        assert sorted(status for status, _, _ in answers) == [200, 200, 503]
        entries = await stubs.timeline("crm")
        assert sorted(entry.status for entry in entries) == [200, 200, 503]
        assert max(entry.waited for entry in entries) > 0
        assert (await stubs.stats("crm"))["peak_concurrent"] == 2
        later = await stubs.timeline("crm", since=max(entry.end for entry in entries))
        assert later == []
        await stubs.reset()
        behaviour = await stubs.behave("crm")
        assert {name: behaviour[name] for name in DEFAULT_BEHAVIOUR} == DEFAULT_BEHAVIOUR
        assert await stubs.timeline("crm") == []
