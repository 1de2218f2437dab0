"""SecretCache: an in-memory cache of CredStash secrets in front of any ``SecretStore``.

Secrets are read once, then re-read on a timer once per ``ttl_seconds``, each refresh
``refresh_ahead_seconds`` before the value it replaces expires, whether or not anybody asks:
under load a secret costs exactly one store read per TTL, and the first request after a long
idle still finds a fresh value. While the store is unreachable, values are served stale (for
at most ``max_stale_seconds`` past expiry) and the timer retries with backoff. Concurrent
misses of one key share a single fetch. Failures are never cached, and permanent failures (no
such secret, integrity) are never hidden behind a stale value. Values are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Protocol

from .. import metrics
from ..errors import PermanentError
from ..settings import SecretSettings
from ..singleflight import SingleFlight
from .errors import SecretUnavailableError

log = logging.getLogger("courier.secrets")

# (name, sorted encryption-context items): the same context given in any order is one entry.
CacheKey = tuple[str, tuple[tuple[str, str], ...]]
Trigger = Literal["miss", "refresh"]

# Retries of a failed refresh: from RETRY_FIRST_SECONDS, doubling up to RETRY_MAX_SECONDS, each
# capped at a fraction of the TTL (so short test and benchmark TTLs retry proportionally sooner).
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0


class SecretStore(Protocol):
    """Anything that can produce the plaintext of a secret (``CredStash`` is one)."""

    async def get(
        self, name: str, version: str | None = None, context: Mapping[str, str] | None = None
    ) -> str:
        """The plaintext of ``name`` (latest version unless ``version``)."""
        ...


@dataclass(frozen=True, slots=True)
class _Entry:
    value: str
    expires_at: float
    fetched_at: float


@dataclass(frozen=True, slots=True)
class CachedSecret:
    """What the cache knows of one secret, never its value (the operator console shows it)."""

    name: str
    context: tuple[tuple[str, str], ...]
    age_seconds: float | None  # since the value was read from the store; None = not cached
    expires_in_seconds: float | None  # negative: served stale
    refresh_in_seconds: float | None  # the next timed refresh (or retry); None = none timed
    failing: str  # the last fetch's error while it keeps failing ("" = none)


class SecretCache:
    """TTL cache with timed refreshes, bounded stale-if-error and single-flight fetches.

    Every key loaded once is refreshed by a timer of its own (``loop.call_later``), once per
    TTL and ``refresh_ahead_seconds`` (at most half the TTL) before its value expires. Refresh
    times are anchored to the previous expiry, not to when a read ended, so they do not drift:
    one read per TTL exactly. A refreshed value therefore expires up to ``ttl_seconds +
    refresh_ahead_seconds`` after its read, but it is replaced once per TTL while the store
    answers. A key nobody asks for any more keeps being refreshed: one read per TTL per key
    is the price of never making a request wait for the store after an idle (the keys are the
    few secrets the configuration names, so this is bounded).

    A failed refresh keeps the value (stale past its expiry, within ``max_stale_seconds``) and
    is retried with jittered exponential backoff, never in a loop; a permanent failure (the
    secret was deleted or fails its integrity check) is not retried: the value is served until
    it expires, then requests read the store themselves and get the error.

    Use as ``async with SecretCache(store, settings) as cache:`` (or call ``aclose``) so the
    timers and fetches are cancelled when the owner stops. ``clock`` must be monotonic
    (seconds); tests inject a fake one. Timers run on the event loop's clock, for the delays
    ``clock`` gives.
    """

    def __init__(
        self,
        store: SecretStore,
        settings: SecretSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._settings = settings or SecretSettings()
        self._clock = clock
        self._entries: dict[CacheKey, _Entry] = {}
        # Keys fetched successfully at least once, kept even when caching is off so that
        # readiness works in the stateless (benchmark) mode too.
        self._loaded: set[CacheKey] = set()
        # At most one fetch per key at a time, shared by misses and refreshes alike.
        self._fetches: SingleFlight[CacheKey, str] = SingleFlight()
        # Keys whose last fetch failed transiently: while the store is down, an expired value
        # is served at once (within max_stale) and the fetch retried in the background, so
        # requests do not each wait out the AWS client's timeouts and retries.
        self._failing: dict[CacheKey, Exception] = {}
        # The next refresh (or retry) of each loaded key, and how many retries failed in a row.
        self._timers: dict[CacheKey, asyncio.TimerHandle] = {}
        self._retries: dict[CacheKey, int] = {}
        self._closed = False

    async def get(self, name: str, context: Mapping[str, str] | None = None) -> str:
        """The latest value of ``name`` under the KMS encryption ``context``.

        ``context`` None means the store's own (the deployment's ``secrets.encryption_context``).

        Raises ``SecretNotFoundError`` / ``SecretIntegrityError`` as the store does, and
        ``SecretUnavailableError`` when the store fails and no value is fresh enough to serve.
        """
        key = _cache_key(name, context)
        if not self._settings.cache_enabled:
            return await self._uncached(key)
        entry = self._entries.get(key)
        now = self._clock()
        if entry is not None and now < entry.expires_at:
            metrics.secret_lookups.labels("hit").inc()
            return entry.value
        failure = self._failing.get(key)
        if (
            entry is not None
            and failure is not None
            and now - entry.expires_at < self._settings.max_stale_seconds
        ):
            # The timer is retrying: requests do not each wait out the failing store.
            return self._stale_or_raise(key, failure)
        try:
            value = await self._shared_fetch(key)
        except Exception as exc:
            return self._stale_or_raise(key, exc)
        metrics.secret_lookups.labels("miss").inc()
        return value

    async def prefetch(self, names: Iterable[str]) -> None:
        """Load every name (under the store's own context) concurrently.

        Raises the first failure after all fetches end.
        """
        results = await asyncio.gather(*(self.get(name) for name in names), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def loaded(self, names: Iterable[str]) -> bool:
        """True when every name (store's context) has been fetched successfully at least once.

        A value past its TTL still counts: during a store outage the cache serves it, and
        readiness failing on every instance at once would take the whole fleet out.
        """
        return all(_cache_key(name, None) in self._loaded for name in names)

    def describe(self) -> list[CachedSecret]:
        """Every key loaded so far: ages and timers, never values."""
        now, loop_now = self._clock(), asyncio.get_running_loop().time()
        described = []
        for key in sorted(self._loaded | set(self._entries)):
            entry = self._entries.get(key)
            timer = self._timers.get(key)
            failure = self._failing.get(key)
            described.append(
                CachedSecret(
                    name=key[0],
                    context=key[1],
                    age_seconds=None if entry is None else now - entry.fetched_at,
                    expires_in_seconds=None if entry is None else entry.expires_at - now,
                    refresh_in_seconds=None if timer is None else timer.when() - loop_now,
                    failing="" if failure is None else type(failure).__name__,
                )
            )
        return described

    async def aclose(self) -> None:
        """Cancel the timers and in-flight fetches and refuse new ones; values stay readable."""
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        await self._fetches.cancel_all()

    async def __aenter__(self) -> SecretCache:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _uncached(self, key: CacheKey) -> str:
        metrics.secret_lookups.labels("miss").inc()
        try:
            value = await self._store.get(key[0], context=dict(key[1]) or None)
        except Exception:
            metrics.secret_fetches.labels("miss", "error").inc()
            raise
        metrics.secret_fetches.labels("miss", "ok").inc()
        self._loaded.add(key)
        return value

    async def _shared_fetch(self, key: CacheKey) -> str:
        task = self._fetch_task(key, "miss")
        try:
            # shield: a caller that gives up (request timeout) must not cancel the fetch
            # other callers are waiting on.
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                # The fetch was cancelled by aclose, not our caller: report an outage.
                raise SecretUnavailableError(
                    f"secret {key[0]!r}: the secret cache closed during the fetch"
                ) from None
            raise

    def _fetch_task(self, key: CacheKey, trigger: Trigger) -> asyncio.Task[str]:
        if self._closed and not self._fetches.running(key):
            raise SecretUnavailableError(f"secret {key[0]!r}: the secret cache is closed")
        return self._fetches.start(
            key, lambda: self._fetch(key, trigger), name=f"secret-{trigger}:{key[0]}"
        )

    async def _fetch(self, key: CacheKey, trigger: Trigger) -> str:
        try:
            value = await self._store.get(key[0], context=dict(key[1]) or None)
        except Exception as exc:
            metrics.secret_fetches.labels(trigger, "error").inc()
            self._fetch_failed(key, exc, trigger)
            raise
        metrics.secret_fetches.labels(trigger, "ok").inc()
        self._fetched(key, value)
        return value

    def _fetched(self, key: CacheKey, value: str) -> None:
        """Keep ``value`` and time the next refresh."""
        now = self._clock()
        previous = self._entries.get(key)
        # Anchored to the previous expiry when the refresh was on time: one read per TTL,
        # however long each read took.
        starts = now if previous is None else max(now, previous.expires_at)
        entry = _Entry(value, starts + self._settings.ttl_seconds, now)
        self._entries[key] = entry
        self._failing.pop(key, None)
        self._retries.pop(key, None)
        self._loaded.add(key)
        ahead = min(self._settings.refresh_ahead_seconds, self._settings.ttl_seconds / 2)
        self._schedule(key, entry.expires_at - ahead - now)

    def _fetch_failed(self, key: CacheKey, exc: Exception, trigger: Trigger) -> None:
        """Remember a transient failure and retry it later; stop refreshing on a permanent one."""
        if isinstance(exc, PermanentError):
            # Not retried and not served stale: once the value expires, requests read the
            # store and get this error.
            self._failing.pop(key, None)
            self._cancel_timer(key)
            entry = self._entries.get(key)
            if entry is not None and self._clock() >= entry.expires_at:
                del self._entries[key]
            if trigger == "refresh":
                _refresh_failed(key, exc, None)
            return
        self._failing[key] = exc
        if key not in self._entries:
            return  # never loaded: the next request asks again, there is nothing to refresh
        retries = self._retries.get(key, 0) + 1
        self._retries[key] = retries
        delay = self._backoff(retries)
        self._schedule(key, delay)
        if trigger == "refresh":
            _refresh_failed(key, exc, delay)

    def _backoff(self, retries: int) -> float:
        """Seconds before retry number ``retries``: exponential, capped, with equal jitter."""
        ttl = self._settings.ttl_seconds
        first = min(RETRY_FIRST_SECONDS, ttl / 100)
        step = min(RETRY_MAX_SECONDS, ttl / 10, first * 2 ** min(retries - 1, 30))
        return random.uniform(step / 2, step)

    def _schedule(self, key: CacheKey, delay: float) -> None:
        """Refresh ``key`` in ``delay`` seconds, replacing any refresh already timed."""
        self._cancel_timer(key)
        if not self._closed:
            loop = asyncio.get_running_loop()
            self._timers[key] = loop.call_later(max(0.0, delay), self._on_timer, key)

    def _cancel_timer(self, key: CacheKey) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def _on_timer(self, key: CacheKey) -> None:
        self._timers.pop(key, None)
        if not self._closed:
            # Joins a miss already fetching this key rather than reading twice.
            self._fetch_task(key, "refresh")

    def _stale_or_raise(self, key: CacheKey, exc: Exception) -> str:
        entry = self._entries.get(key)
        if isinstance(exc, PermanentError) or entry is None:
            # A deleted or tampered secret must surface, not hide behind an old value.
            metrics.secret_lookups.labels("miss").inc()
            raise exc
        age = self._clock() - entry.expires_at
        limit = self._settings.max_stale_seconds
        if age >= limit:
            metrics.secret_lookups.labels("miss").inc()
            raise SecretUnavailableError(
                f"secret {key[0]!r}: the store failed and the cached value expired "
                f"{age:.0f}s ago, beyond max_stale_seconds={limit:g} ({exc})"
            ) from exc
        metrics.secret_lookups.labels("stale").inc()
        log.warning(
            "serving secret %r %.0fs past its TTL because the store failed",
            key[0],
            age,
            extra={
                "fields": {
                    "event": "secret_stale",
                    "secret": key[0],
                    "stale_seconds": round(age, 3),
                    "error": f"{type(exc).__name__}: {exc}",
                }
            },
        )
        return entry.value


def _cache_key(name: str, context: Mapping[str, str] | None) -> CacheKey:
    return name, tuple(sorted((context or {}).items()))


def _refresh_failed(key: CacheKey, exc: Exception, retry_in: float | None) -> None:
    # Nobody awaits a background refresh: this line is the only trace of its failure.
    then = "not retrying" if retry_in is None else f"retrying in {retry_in:.1f}s"
    log.warning(
        "background refresh of secret %r failed; keeping the cached value, %s",
        key[0],
        then,
        extra={
            "fields": {
                "event": "secret_refresh_failed",
                "secret": key[0],
                "error": f"{type(exc).__name__}: {exc}",
                "retry_in_seconds": None if retry_in is None else round(retry_in, 3),
            }
        },
    )
