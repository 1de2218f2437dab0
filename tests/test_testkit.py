"""The test kit's own promises (``courier_testkit``): stub knobs and records, tokens, sampling."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
import jwt
import pytest

import courier_testkit
from courier_testkit import ProcessSampler, StubIdm, StubTarget, free_port, mint_token
from courier_testkit.sampling import cpu_seconds_between, thread_cpu_ns
from service.api.auth import issue_token
from service.settings import load_settings

KEY = "k" * 43


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def deliver(
    http: aiohttp.ClientSession, url: str, username: str, key: str
) -> tuple[int, dict[str, object]]:
    body = {"mailbox": {"username": username}}
    async with http.post(url, json=body, headers={"Idempotency-Key": key}) as reply:
        return reply.status, await reply.json()


async def test_every_name_of_the_kit_api_resolves() -> None:
    missing = [name for name in courier_testkit.__all__ if getattr(courier_testkit, name) is None]
    assert missing == []
    with pytest.raises(AttributeError):
        _ = courier_testkit.no_such_name  # type: ignore[attr-defined]


async def test_a_target_refuses_the_reject_marker_and_records_effects_by_key(
    http: aiohttp.ClientSession,
) -> None:
    stub = StubTarget(name="crm", reject_marker=b"zreject")
    async with stub.serving() as url:
        assert (await deliver(http, url + "/crm", "jane", "r1:crm"))[0] == 200
        assert (await deliver(http, url + "/crm", "jane", "r1:crm"))[0] == 200
        status, answer = await deliver(http, url + "/crm", "zreject-joe", "r2:crm")
        assert (status, answer) == (400, {"error": "refused by the chaos marker"})
        async with http.get(url + "/_chaos/effects") as reply:
            effects = await reply.json()
        async with http.get(url + "/_harness/calls") as reply:
            arrivals = (await reply.json())["calls"]
    assert effects["effects"] == {"r1:crm": 2}
    assert effects["requests"] == {"jane": ["r1"]}
    assert effects["refused"] == {"r2:crm": 1}
    assert effects["calls"] == 3
    assert [key for key, _ in arrivals] == ["r1:crm", "r1:crm", "r2:crm"]
    assert all(at <= time.monotonic() for _, at in arrivals)


async def test_capacity_answers_503_to_calls_beyond_it(http: aiohttp.ClientSession) -> None:
    stub = StubTarget(name="billing")
    stub.behaviour.update({"latency_seconds": 0.5, "capacity": 1})
    async with stub.serving() as url:
        answers = await asyncio.gather(
            deliver(http, url + "/api", "a", "r1:billing"),
            deliver(http, url + "/api", "b", "r2:billing"),
        )
    assert sorted(status for status, _ in answers) == [200, 503]
    assert {"error": "over capacity"} in [answer for _, answer in answers]
    assert len(stub.calls) == 2
    assert sum(stub.effects.values()) == 1


async def test_reset_over_http_forgets_identities_calls_and_records(
    http: aiohttp.ClientSession,
) -> None:
    idm = StubIdm(api_key="secret")
    async with idm.serving() as url:
        headers = {"X-Api-Key": "secret", "Idempotency-Key": "r1:idm"}
        for _ in range(2):  # the repeat is answered from the key, not a second effect
            async with http.post(
                url + "/identities", json={"username": "jane"}, headers=headers
            ) as reply:
                assert reply.status == 201
        assert idm.stats()["effects"] == 1
        assert set(idm.recorder.first_at) == {"r1:idm"}
        async with http.post(url + "/_harness/reset") as reply:
            assert await reply.json() == {"reset": True}
    assert (idm.calls, dict(idm.effects), idm.identities, idm.recorder.first_at) == ([], {}, {}, {})


def test_mint_token_is_courier_tokens_issue_token() -> None:
    auth = load_settings(environ={}).auth
    minted = jwt.decode(mint_token(KEY, auth), options={"verify_signature": False})
    issued = jwt.decode(
        issue_token(KEY, auth, "tester", ["mailbox:create", "mailbox:read"]),
        options={"verify_signature": False},
    )
    assert abs(minted.pop("exp") - issued.pop("exp")) <= 1
    for claim in ("iat", "nbf"):
        assert abs(minted.pop(claim) - issued.pop(claim)) <= 1
    assert minted == issued


def test_mint_token_overrides_claims_and_none_removes_one() -> None:
    token = mint_token(KEY, subject="bench", scopes="mailbox:read", sub="other", exp=None)
    claims = jwt.decode(token, KEY, algorithms=["HS256"], options={"verify_aud": False})
    assert claims["sub"] == "other"
    assert claims["scope"] == "mailbox:read"
    assert "exp" not in claims


def test_process_sampler_reads_cpu_and_memory_of_a_pid() -> None:
    sampler = ProcessSampler(os.getpid())
    assert sampler.pid == os.getpid()
    assert sampler.cpu_seconds() > 0
    assert sampler.memory()["peak_rss"] >= sampler.memory()["rss"] > 0


def test_thread_cpu_counts_what_clock_ticks_cannot_see() -> None:
    me = os.getpid()
    before = thread_cpu_ns(me)
    spin_until = time.process_time() + 0.003  # under one 10 ms clock tick
    while time.process_time() < spin_until:
        pass
    spent = cpu_seconds_between(before, thread_cpu_ns(me))
    assert 0.002 < spent < 0.5
    assert thread_cpu_ns(2**22 + 1) == {}  # above Linux's pid_max: no such process


def test_cpu_between_two_readings_is_counted_per_thread() -> None:
    # Thread 1 ran 5 ms more, thread 2 ended (nothing subtracted), thread 3 is new (whole).
    before = {1: 10_000_000, 2: 90_000_000}
    after = {1: 15_000_000, 3: 2_000_000}
    assert cpu_seconds_between(before, after) == 0.007


def test_an_element_of_a_page_being_replaced_counts_as_gone_in_both_chromedriver_ways() -> None:
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    from courier_testkit.browser import node_gone

    raced = (
        "unknown error: unhandled inspector error: "
        '{"code":-32000,"message":"Node with given id does not belong to the document"}'
    )
    assert node_gone(StaleElementReferenceException("stale element reference"))
    assert node_gone(WebDriverException(raced))
    assert node_gone(WebDriverException("unknown error: No node with given id found"))
    assert not node_gone(WebDriverException("unknown error: net::ERR_CONNECTION_REFUSED"))
    assert not node_gone(WebDriverException())


def test_free_port_refuses_connections() -> None:
    port = free_port()
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", port))
