"""The Secrets page's data: names, the store's latest version, cache age and next refresh.

Never a value: versions come from a Query that projects only ``version`` (CredStash's
``latest_version``), ages and timers from the cache's ``describe``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from ..secrets.cache import CachedSecret, SecretCache
from ..secrets.credstash import CredStash


@dataclass(frozen=True, slots=True)
class SecretRow:
    """One secret on the page."""

    name: str
    version: str  # the store's latest, without its zero padding ("" = unknown)
    cached: CachedSecret | None
    error: str = ""  # why the version could not be read (an exception's class, no detail)


class SecretInfo:
    """Reads what the Secrets page shows."""

    def __init__(self, store: CredStash, cache: SecretCache, configured: Sequence[str]) -> None:
        self._store = store
        self._cache = cache
        self._configured = tuple(configured)

    async def rows(self) -> list[SecretRow]:
        """Every secret the settings name or the cache holds, by name."""
        cached = {entry.name: entry for entry in self._cache.describe() if not entry.context}
        names = sorted(set(self._configured) | set(cached))
        versions = await asyncio.gather(
            *(self._store.latest_version(name) for name in names), return_exceptions=True
        )
        rows = []
        for name, version in zip(names, versions, strict=True):
            if isinstance(version, BaseException):
                rows.append(SecretRow(name, "", cached.get(name), type(version).__name__))
            else:
                shown = (version or "").lstrip("0") or ("0" if version else "")
                rows.append(SecretRow(name, shown, cached.get(name)))
        return rows
