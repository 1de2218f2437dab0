"""SecretCache against CredStash on moto over HTTP, counting the requests that really go out.

Outages are real: a dedicated moto server (sharing the session's in-process state) is
stopped, so DynamoDB/KMS refuse connections, and started again on the same port.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from prometheus_client import REGISTRY

from service.aws import AwsClients, client_config
from service.bootstrap import Resources
from service.local import EmbeddedAws
from service.secrets.cache import SecretCache
from service.secrets.credstash import CredStash
from service.secrets.errors import SecretIntegrityError, SecretNotFoundError, SecretUnavailableError
from service.settings import AwsSettings, SecretSettings

CONTEXT = {"app": "courier", "env": "test"}


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingStore:
    """Wraps a real CredStash: counts calls and can hold them at a gate."""

    def __init__(self, inner: CredStash) -> None:
        self.inner = inner
        self.calls = 0
        self.finished = 0
        self.cancelled = 0
        self.started: list[float] = []  # time.monotonic() of each call
        self.gate: asyncio.Event | None = None

    async def get(
        self, name: str, version: str | None = None, context: Mapping[str, str] | None = None
    ) -> str:
        self.calls += 1
        self.started.append(time.monotonic())
        try:
            if self.gate is not None:
                await self.gate.wait()
            return await self.inner.get(name, version, context)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.finished += 1


class Outage:
    """A moto server of our own that a test can stop (outage) and start again (recovery)."""

    def __init__(self) -> None:
        self.server = EmbeddedAws()
        self.endpoint_url = self.server.start()
        self.port = int(self.endpoint_url.rsplit(":", 1)[1])
        self.running = True

    def begin(self) -> None:
        self.server.stop()
        self.running = False

    def end(self) -> None:
        self.server = EmbeddedAws(port=self.port)
        self.server.start()
        self.running = True


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def aws_requests(service: str, operation: str) -> float:
    return sample("courier_aws_requests_total", service=service, operation=operation)


def lookups(result: str) -> float:
    return sample("courier_secret_lookups_total", result=result)


def fetches(trigger: str, outcome: str) -> float:
    return sample("courier_secret_fetches_total", trigger=trigger, outcome=outcome)


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.fixture
def store(aws: AwsClients, resources: Resources) -> CredStash:
    return CredStash(aws.dynamodb, aws.kms, resources.secrets_table)


@pytest.fixture
def put(store: CredStash, resources: Resources) -> Callable[..., Any]:
    async def put(name: str, value: str, context: Mapping[str, str] | None = None) -> None:
        await store.put(name, value, kms_key=resources.credstash_key_arn, context=context)

    return put


@pytest.fixture
def name() -> str:
    return f"test.secrets.{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def outage(resources: Resources) -> AsyncIterator[tuple[Outage, CredStash]]:
    """A dedicated moto endpoint and a CredStash on it with short timeouts.

    courier's client config, but one attempt per call: botocore's standard mode would
    otherwise retry a refused connection with jittered backoff (seconds per failed fetch),
    and these tests are about what the cache does with a failure, not about botocore.
    """
    outage = Outage()
    settings = AwsSettings(
        region="us-east-1",
        endpoint_url=outage.endpoint_url,
        connect_timeout_seconds=0.2,
        read_timeout_seconds=1,
    )
    config = client_config(settings).merge(
        AioConfig(retries={"mode": "standard", "total_max_attempts": 1})
    )
    session = get_session()
    try:
        async with (
            session.create_client(
                "dynamodb", region_name="us-east-1", endpoint_url=outage.endpoint_url, config=config
            ) as dynamodb,
            session.create_client(
                "kms", region_name="us-east-1", endpoint_url=outage.endpoint_url, config=config
            ) as kms,
        ):
            yield outage, CredStash(dynamodb, kms, resources.secrets_table)
    finally:
        if outage.running:
            outage.server.stop()


async def test_concurrent_misses_share_one_fetch(store: CredStash, put: Any, name: str) -> None:
    await put(name, "cold-value")
    queries, decrypts = aws_requests("dynamodb", "Query"), aws_requests("kms", "Decrypt")
    fetched = fetches("miss", "ok")
    async with SecretCache(store) as cache:
        values = await asyncio.gather(*(cache.get(name) for _ in range(100)))
    assert values == ["cold-value"] * 100
    assert aws_requests("dynamodb", "Query") - queries == 1
    assert aws_requests("kms", "Decrypt") - decrypts == 1
    assert fetches("miss", "ok") - fetched == 1


async def test_value_is_cached_until_ttl_then_fetched_again(
    store: CredStash, put: Any, name: str
) -> None:
    clock = FakeClock()
    counting = CountingStore(store)
    settings = SecretSettings(ttl_seconds=60, refresh_ahead_seconds=0)
    await put(name, "v1")
    async with SecretCache(counting, settings, clock=clock) as cache:
        hits = lookups("hit")
        assert await cache.get(name) == "v1"
        await put(name, "v2")
        clock.now += 59.9
        assert await cache.get(name) == "v1"
        assert counting.calls == 1
        assert lookups("hit") - hits == 1
        clock.now += 0.1
        assert await cache.get(name) == "v2"
        assert counting.calls == 2


async def test_while_the_timer_refreshes_callers_get_the_cached_value_at_once(
    store: CredStash, put: Any, name: str
) -> None:
    counting = CountingStore(store)
    await put(name, "v1")
    refreshed = fetches("refresh", "ok")
    async with SecretCache(counting, TIMER_SETTINGS) as cache:
        assert await cache.get(name) == "v1"
        await put(name, "v2")
        counting.gate = asyncio.Event()  # hold the refresh so the gets below overlap it
        await eventually(lambda: counting.calls == 2)  # the timer's refresh, at 0.7 s
        gets = asyncio.gather(*(cache.get(name) for _ in range(20)))
        assert await asyncio.wait_for(gets, 1) == ["v1"] * 20
        assert counting.calls == 2, "the gets started no read of their own"
        counting.gate.set()
        await eventually(lambda: counting.finished == 2)
        assert await cache.get(name) == "v2"
        assert counting.calls == 2  # the next read is a TTL later
    assert fetches("refresh", "ok") - refreshed == 1


async def test_stale_value_served_within_bound_then_refused_beyond(
    outage: tuple[Outage, CredStash],
    put: Any,
    name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, store = outage
    clock = FakeClock()
    settings = SecretSettings(ttl_seconds=60, refresh_ahead_seconds=0, max_stale_seconds=300)
    await put(name, "stale-but-useful")
    async with SecretCache(store, settings, clock=clock) as cache:
        assert await cache.get(name) == "stale-but-useful"
        server.begin()
        clock.now += 60 + 120
        stale = lookups("stale")
        with caplog.at_level(logging.WARNING, logger="courier.secrets"):
            assert await cache.get(name) == "stale-but-useful"
        assert lookups("stale") - stale == 1
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings
        assert name in warnings[0].getMessage()
        assert "EndpointConnectionError" in warnings[0].fields["error"]  # type: ignore[attr-defined]
        assert "stale-but-useful" not in caplog.text
        assert all("stale-but-useful" not in str(r.__dict__) for r in caplog.records)

        clock.now += 180  # now 300 s past expiry: the bound
        with pytest.raises(SecretUnavailableError, match=r"expired 300s ago") as raised:
            await cache.get(name)
        assert name in str(raised.value)
        assert "max_stale_seconds=300" in str(raised.value)

        server.end()  # the outage is over: the very next get goes to the store and succeeds
        assert await cache.get(name) == "stale-but-useful"


async def test_outage_failure_is_not_cached(
    outage: tuple[Outage, CredStash], put: Any, name: str
) -> None:
    server, store = outage
    await put(name, "after-the-outage")
    server.begin()
    errors = fetches("miss", "error")
    async with SecretCache(store) as cache:
        with pytest.raises(SecretUnavailableError, match=name):
            await cache.get(name)
        assert not cache.loaded([name])
        server.end()
        assert await cache.get(name) == "after-the-outage"
        assert cache.loaded([name])
    assert fetches("miss", "error") - errors == 1


async def test_not_found_is_not_cached(store: CredStash, put: Any, name: str) -> None:
    counting = CountingStore(store)
    async with SecretCache(counting) as cache:
        with pytest.raises(SecretNotFoundError):
            await cache.get(name)
        await put(name, "created-later")
        assert await cache.get(name) == "created-later"
        assert counting.calls == 2


async def test_permanent_errors_are_not_hidden_by_a_stale_value(
    aws: AwsClients, store: CredStash, put: Any, name: str, resources: Resources
) -> None:
    clock = FakeClock()
    settings = SecretSettings(ttl_seconds=60, refresh_ahead_seconds=0, max_stale_seconds=3600)
    await put(name, "v1")
    async with SecretCache(store, settings, clock=clock) as cache:
        assert await cache.get(name) == "v1"
        # v2 is sealed under a context this caller does not present: KMS refuses it.
        await put(name, "v2", context={"tenant": "someone-else"})
        clock.now += 61
        with pytest.raises(SecretIntegrityError):
            await cache.get(name)
        for version in ("1", "2"):
            await aws.dynamodb.delete_item(
                TableName=resources.secrets_table,
                Key={"name": {"S": name}, "version": {"S": version.zfill(19)}},
            )
        with pytest.raises(SecretNotFoundError):
            await cache.get(name)


async def test_context_is_part_of_the_key(store: CredStash, put: Any, name: str) -> None:
    counting = CountingStore(store)
    await put(name, "bound-to-context", context=CONTEXT)
    async with SecretCache(counting) as cache:
        assert await cache.get(name, {"env": "test", "app": "courier"}) == "bound-to-context"
        assert await cache.get(name, {"app": "courier", "env": "test"}) == "bound-to-context"
        assert counting.calls == 1
        with pytest.raises(SecretIntegrityError):
            await cache.get(name)
        with pytest.raises(SecretIntegrityError):
            await cache.get(name, {"app": "courier", "env": "prod"})
        assert counting.calls == 3


async def test_prefetch_loads_all_and_loaded_reports_it(
    store: CredStash, put: Any, name: str
) -> None:
    first, second, missing = f"{name}.a", f"{name}.b", f"{name}.missing"
    await put(first, "a")
    await put(second, "b")
    counting = CountingStore(store)
    async with SecretCache(counting) as cache:
        assert not cache.loaded([first, second])
        await cache.prefetch([first, second])
        assert cache.loaded([first, second])
        assert counting.calls == 2
        assert await cache.get(first) == "a"
        assert counting.calls == 2
        with pytest.raises(SecretNotFoundError, match="missing"):
            await cache.prefetch([first, missing])
        assert not cache.loaded([first, missing])


async def test_failed_background_refresh_is_quiet_and_keeps_the_value(
    outage: tuple[Outage, CredStash],
    put: Any,
    name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, store = outage
    counting = CountingStore(store)
    loop = asyncio.get_running_loop()
    loop_errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    await put(name, "kept")
    errors = fetches("refresh", "error")
    try:
        async with SecretCache(counting, TIMER_SETTINGS) as cache:
            assert await cache.get(name) == "kept"
            server.begin()
            counting.gate = asyncio.Event()  # the refresh is held until the caller has its value
            with caplog.at_level(logging.WARNING, logger="courier.secrets"):
                await eventually(lambda: counting.calls == 2)  # the timer's refresh started...
                # A caller that waited for the refresh would wait for the gate: never answered.
                assert await asyncio.wait_for(cache.get(name), 10) == "kept"
                assert counting.finished == 1  # ...and is still held: the caller did not wait
                counting.gate.set()
                await eventually(lambda: counting.finished >= 2)  # retries follow within 0.1 s
            assert await cache.get(name) == "kept"
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert fetches("refresh", "error") - errors >= 1  # and its retries
    assert loop_errors == []
    failures = [r for r in caplog.records if "background refresh" in r.getMessage()]
    assert failures
    assert "retrying in" in failures[0].getMessage()
    assert failures[0].fields["event"] == "secret_refresh_failed"  # type: ignore[attr-defined]
    assert "kept" not in caplog.text


async def test_aclose_cancels_background_work(store: CredStash, put: Any, name: str) -> None:
    counting = CountingStore(store)
    settings = SecretSettings(ttl_seconds=2, refresh_ahead_seconds=1)
    await put(name, "v1")
    cold = f"{name}.cold"
    cache = SecretCache(counting, settings)
    assert await cache.get(name) == "v1"
    counting.gate = asyncio.Event()  # never set: both fetches below hang until cancelled
    await eventually(lambda: counting.calls == 2)  # the timer's refresh, at 1 s
    waiter = asyncio.create_task(cache.get(cold))  # a miss waiting on its fetch
    await eventually(lambda: counting.calls == 3)

    await cache.aclose()

    assert counting.cancelled == 2
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("secret-")]
    with pytest.raises(SecretUnavailableError, match="closed during the fetch"):
        await waiter
    assert await cache.get(name) == "v1"  # still fresh (until 2 s): served, no new refresh
    assert counting.calls == 3
    with pytest.raises(SecretUnavailableError, match="is closed"):
        await cache.get(f"{name}.never-loaded")


async def test_disabled_cache_goes_to_the_store_every_time(
    store: CredStash, put: Any, name: str
) -> None:
    await put(name, "uncached")
    queries, decrypts = aws_requests("dynamodb", "Query"), aws_requests("kms", "Decrypt")
    async with SecretCache(store, SecretSettings(cache_enabled=False)) as cache:
        for _ in range(5):
            assert await cache.get(name) == "uncached"
        await cache.prefetch([name])
        assert cache.loaded([name])  # readiness still works in the stateless mode
    assert aws_requests("dynamodb", "Query") - queries == 6
    assert aws_requests("kms", "Decrypt") - decrypts == 6


async def test_while_the_store_fails_expired_values_are_served_without_waiting(
    outage: tuple[Outage, CredStash], put: Any, name: str
) -> None:
    server, store = outage
    clock = FakeClock()
    counting = CountingStore(store)
    settings = SecretSettings(ttl_seconds=60, refresh_ahead_seconds=10, max_stale_seconds=300)
    await put(name, "keep-serving")
    async with SecretCache(counting, settings, clock=clock) as cache:
        assert await cache.get(name) == "keep-serving"
        server.begin()
        clock.now += 61  # expired before its (real-time) timer fired: this get reads and fails
        assert await cache.get(name) == "keep-serving"
        assert counting.calls == 2
        counting.gate = asyncio.Event()  # a fetch would now block until released
        clock.now += 30
        for _ in range(50):  # the store is known to be failing: no get reads it
            assert await cache.get(name) == "keep-serving"
        assert counting.calls == 2
        assert await asyncio.wait_for(cache.get(name), 0.5) == "keep-serving"
        counting.gate.set()
        server.end()
        # The failure was retried on a timer (backoff under 1 s at this TTL); it succeeds now.
        await eventually(lambda: not cache._failing)
        calls, hits = counting.calls, lookups("hit")
        clock.now += 1
        assert await cache.get(name) == "keep-serving"
        assert (counting.calls, lookups("hit") - hits) == (calls, 1)  # fresh again


# --- the daemon reads its secrets under the deployment's encryption context -----------------


async def test_the_daemon_loads_secrets_stored_under_the_configured_context(
    settings: Any, put: Callable[..., Any]
) -> None:
    """Secrets put with `credstash put NAME VALUE app=courier env=test` make the API ready only
    when secrets.encryption_context names that context (IAM can then require it)."""
    import dataclasses

    import aiohttp

    from service import daemon
    from service.settings import FrozenMap

    suffix = uuid.uuid4().hex[:8]
    hs256, api_key = f"ctx.jwt.{suffix}", f"ctx.idm.{suffix}"
    await put(hs256, "context-hs256-key-0123456789abcdef0123456789", CONTEXT)
    await put(api_key, "context-idm-key", CONTEXT)
    base = settings.replace(
        role="api",
        http=dataclasses.replace(settings.http, port=0, drain_seconds=1),
        auth=dataclasses.replace(settings.auth, hs256_secret=hs256),
        idm=dataclasses.replace(settings.idm, api_key_secret=api_key),
    )

    async def readiness(context: Mapping[str, str]) -> tuple[int, Any]:
        secrets = dataclasses.replace(base.secrets, encryption_context=FrozenMap(context))
        async with (
            daemon.serving(base.replace(secrets=secrets)) as listening,
            aiohttp.ClientSession() as http,
        ):
            deadline = time.monotonic() + 5
            while True:
                async with http.get(f"{listening.url}/readyz") as response:
                    status, body = response.status, await response.json()
                if status == 200 or time.monotonic() > deadline:
                    return status, body
                await asyncio.sleep(0.05)

    assert (await readiness(CONTEXT))[0] == 200
    status, body = await readiness({})
    assert status == 503
    assert body["checks"]["secrets"] != "ok"


# --- refresh on a timer, not on access (real clock: these tests wait out real TTLs) ---------
#
# TTL 1 s and refresh-ahead 0.3 s: a secret loaded at t=0 is refreshed at 0.7, 1.7, 2.7, ...
# (one read per TTL), whether or not anybody asks for it.

TIMER_SETTINGS = SecretSettings(ttl_seconds=1, refresh_ahead_seconds=0.3, max_stale_seconds=300)


async def test_under_load_each_secret_is_read_once_per_ttl(
    store: CredStash, put: Any, name: str
) -> None:
    counting = CountingStore(store)
    await put(name, "steady")
    refreshed, misses = fetches("refresh", "ok"), lookups("miss")
    async with SecretCache(counting, TIMER_SETTINGS) as cache:
        assert await cache.get(name) == "steady"
        loaded = time.monotonic()

        async def client() -> None:
            while time.monotonic() - loaded < 4.2:
                assert await cache.get(name) == "steady"
                await asyncio.sleep(0.005)

        await asyncio.gather(*(client() for _ in range(20)))
    # The load and the refreshes due at 0.7, 1.7, 2.7 and 3.7 s: one read per TTL.
    assert counting.calls == 5, counting.started
    gaps = [later - earlier for earlier, later in itertools.pairwise(counting.started[1:])]
    assert all(0.8 < gap < 1.2 for gap in gaps), gaps
    assert fetches("refresh", "ok") - refreshed == 4
    assert lookups("miss") - misses == 1, "every get after the first found a fresh value"


async def test_a_get_after_an_idle_longer_than_the_ttl_reads_nothing(
    store: CredStash, put: Any, name: str
) -> None:
    counting = CountingStore(store)
    await put(name, "before-the-idle")
    async with SecretCache(counting, TIMER_SETTINGS) as cache:
        assert await cache.get(name) == "before-the-idle"
        await put(name, "rotated-during-the-idle")
        await asyncio.sleep(2.2)  # nobody asks; refreshes were due at 0.7 and 1.7 s
        await eventually(lambda: counting.finished == 3)
        counting.gate = asyncio.Event()  # never set: a get that read the store would hang
        hits, misses = lookups("hit"), lookups("miss")
        assert await asyncio.wait_for(cache.get(name), 1) == "rotated-during-the-idle"
        assert counting.calls == 3
        assert (lookups("hit") - hits, lookups("miss") - misses) == (1, 0)


async def test_a_failing_refresh_serves_stale_and_retries_with_backoff(
    outage: tuple[Outage, CredStash],
    put: Any,
    name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, store = outage
    counting = CountingStore(store)
    await put(name, "kept")
    stale, misses, errors = lookups("stale"), lookups("miss"), fetches("refresh", "error")
    async with SecretCache(counting, TIMER_SETTINGS) as cache:
        assert await cache.get(name) == "kept"
        server.begin()
        down = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="courier.secrets"):
            while time.monotonic() - down < 3:  # gets every 10 ms, expired after 1 s
                assert await asyncio.wait_for(cache.get(name), 1) == "kept"
                await asyncio.sleep(0.01)
        failed = counting.started[1:]
        assert lookups("stale") - stale > 50
        assert lookups("miss") - misses == 1, "no get waited for the store"
        # Retries back off (TTL 1 s: from 10 ms up to 100 ms, jittered): neither a read per
        # get (about 200 here) nor one per TTL while the store is down.
        assert 10 <= len(failed) <= 60, len(failed)
        gaps = [later - earlier for earlier, later in itertools.pairwise(failed)]
        assert statistics.median(gaps[-10:]) >= 0.045, gaps
        assert fetches("refresh", "error") - errors == len(failed)
        assert "kept" not in caplog.text
        server.end()
        await put(name, "after-the-outage")
        deadline = time.monotonic() + 5  # the next retry succeeds, then the next TTL's read
        while await cache.get(name) != "after-the-outage":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert lookups("miss") - misses == 1


async def test_aclose_cancels_the_timers(store: CredStash, put: Any, name: str) -> None:
    counting = CountingStore(store)
    names = [name, f"{name}.b"]
    for each in names:
        await put(each, "v1")
    cache = SecretCache(counting, TIMER_SETTINGS)
    await cache.prefetch(names)
    counting.gate = asyncio.Event()  # never set: the timers' refreshes hang until cancelled
    await eventually(lambda: counting.calls == 4, timeout=5)  # nobody asked: the timers did

    await cache.aclose()

    assert counting.cancelled == 2
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("secret-")]
    await asyncio.sleep(1.5)  # past every refresh that was due: none is left to fire
    assert counting.calls == 4


async def test_a_deleted_secret_is_not_hidden_and_not_retried(
    aws: AwsClients, store: CredStash, put: Any, name: str, resources: Resources
) -> None:
    counting = CountingStore(store)
    await put(name, "v1")
    async with SecretCache(counting, TIMER_SETTINGS) as cache:
        assert await cache.get(name) == "v1"
        await aws.dynamodb.delete_item(
            TableName=resources.secrets_table,
            Key={"name": {"S": name}, "version": {"S": "1".zfill(19)}},
        )
        await eventually(lambda: counting.finished == 2)  # the refresh at 0.7 s: not found
        await asyncio.sleep(0.6)  # the value has expired (1 s)
        assert counting.calls == 2, "a permanent failure is not retried in the background"
        with pytest.raises(SecretNotFoundError):
            await cache.get(name)
        await asyncio.sleep(1)
        assert counting.calls == 3  # only the get read the store
