"""Bearer JWT verification: HS256 with a key from CredStash, RS256/ES256 with keys from a JWKS URL.

The algorithm in the token header only selects which *configured* key family may verify it:
HS256 is verified with the shared secret and nothing else, RS256/ES256 only with a JWKS key
of the same algorithm, and ``none`` or any other algorithm is refused. That closes
``alg: none`` and HS/RS confusion (an RSA public key used as an HMAC secret).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt

from .. import metrics
from ..errors import TransientError
from ..http_headers import delta_seconds, http_date
from ..settings import AuthSettings
from .problems import Problem

log = logging.getLogger("courier.auth")

MAX_TOKEN_BYTES = 8192
MAX_KID_LENGTH = 128
ASYMMETRIC = {"RS256": "RSA", "ES256": "EC"}
REALM = 'Bearer realm="courier"'
# A JWKS that forbids caching is still not fetched more than once a second per process.
MIN_LIFETIME_SECONDS = 1.0
# After a failed fetch of an expired set, the pause before the next attempt.
FAILED_FETCH_RETRY_SECONDS = 5.0
# Tokens remembered as verified (see ``VerifiedTokens``); the oldest is forgotten past this.
VERIFIED_TOKENS = 1024


class AuthError(Problem):
    """A rejected token (401) or a missing scope (403), with its WWW-Authenticate challenge."""

    def __init__(self, reason: str, detail: str, *, scope: str | None = None) -> None:
        metrics.auth_rejected.labels(reason).inc()
        if scope is not None:
            challenge = f'{REALM}, error="insufficient_scope", scope="{scope}"'
            super().__init__(
                403,
                "insufficient-scope",
                "Forbidden",
                detail,
                headers={"WWW-Authenticate": challenge},
            )
        else:
            # RFC 6750 §3.1: no error code when the client sent no Bearer credentials at all.
            no_bearer = reason in ("missing", "unsupported_scheme")
            challenge = REALM if no_bearer else f'{REALM}, error="invalid_token"'
            super().__init__(
                401,
                "invalid-token",
                "Unauthorized",
                detail,
                headers={"WWW-Authenticate": challenge},
            )
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the token's subject and scopes."""

    subject: str
    scopes: frozenset[str]
    claims: Mapping[str, Any]


class Jwks:
    """Keys from a JWKS URL, cached for the response's freshness lifetime and never longer than
    ``max_age_seconds``, so a key removed from the set is refused within that bound.

    - Lifetime: ``Cache-Control: max-age`` (less ``Age``), else ``Expires`` - ``Date``, else
      ``max_age_seconds``; always within [MIN_LIFETIME_SECONDS, ``max_age_seconds``]. The first
      lookup after it ends refetches the set before answering; concurrent lookups share one fetch.
    - An unknown ``kid`` in a fresh set refetches at most once per ``min_refresh_seconds`` (a key
      published since the last fetch).
    - A failed refetch keeps the expired keys for a grace of one more ``max_age_seconds``
      (logged as ``jwks_stale``), retrying every FAILED_FETCH_RETRY_SECONDS: an outage of the
      JWKS endpoint does not lock every RS256/ES256 client out at once. Past the grace the keys
      are dropped (``jwks_expired``) and those tokens get TransientError (503) until it answers.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        min_refresh_seconds: float,
        *,
        max_age_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._url = url
        self._min_refresh = min_refresh_seconds
        self._max_age = max_age_seconds
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._expires_at: float | None = None  # end of the keys' lifetime; None = no usable keys
        self._attempted_at: float | None = None  # last fetch attempt, success or not
        self._failed_at: float | None = None  # last failed attempt; None once one succeeds
        self._lock = asyncio.Lock()

    async def key(self, kid: str) -> jwt.PyJWK | None:
        """The key with ``kid``, refetching the set when it expired or ``kid`` is new to it."""
        if self._fresh() and kid in self._keys:
            return self._keys[kid]
        async with self._lock:  # concurrent lookups share one fetch
            if self._should_fetch(kid):
                await self._fetch()
            self._drop_past_grace()
        if self._expires_at is None:
            # No usable keys (never fetched, or stale past the grace): "try later", not "bad token".
            raise TransientError("signing keys are unavailable (JWKS fetch failed)")
        return self._keys.get(kid)

    def _fresh(self) -> bool:
        return self._expires_at is not None and self._clock() < self._expires_at

    def _should_fetch(self, kid: str) -> bool:
        now = self._clock()
        if not self._fresh():
            # Expired (or never loaded): refetch, but not on every call while the JWKS fails.
            return self._failed_at is None or now - self._failed_at >= FAILED_FETCH_RETRY_SECONDS
        if kid in self._keys:
            return False
        return self._attempted_at is None or now - self._attempted_at >= self._min_refresh

    async def _fetch(self) -> None:
        self._attempted_at = self._clock()
        try:
            timeout = aiohttp.ClientTimeout(total=5)
            async with self._session.get(self._url, timeout=timeout) as response:
                response.raise_for_status()
                document = await response.json(content_type=None)
                lifetime = freshness_lifetime(response.headers)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._failed_at = self._clock()
            self._log_failure(exc)
            return
        if lifetime is None:
            lifetime = self._max_age
        lifetime = min(max(lifetime, MIN_LIFETIME_SECONDS), self._max_age)
        self._keys = _parse_jwks(document)
        self._expires_at = self._attempted_at + lifetime
        self._failed_at = None
        log.info(
            "JWKS loaded",
            extra={
                "fields": {"event": "jwks_loaded", "keys": len(self._keys), "ttl_seconds": lifetime}
            },
        )

    def _log_failure(self, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"[:200]
        if self._expires_at is None or self._fresh():
            fields: dict[str, Any] = {"event": "jwks_fetch_failed", "error": error}
            log.warning("JWKS fetch failed", extra={"fields": fields})
            return
        fields = {
            "event": "jwks_stale",
            "error": error,
            "stale_seconds": round(self._clock() - self._expires_at, 3),
            "grace_seconds": self._max_age,
        }
        log.warning(
            "JWKS fetch failed; serving the expired keys within the grace", extra={"fields": fields}
        )

    def _drop_past_grace(self) -> None:
        if self._expires_at is None or self._clock() < self._expires_at + self._max_age:
            return
        self._keys, self._expires_at = {}, None
        log.error(
            "JWKS unreachable past the grace: RS256/ES256 tokens get 503 until it answers",
            extra={"fields": {"event": "jwks_expired", "grace_seconds": self._max_age}},
        )


def freshness_lifetime(headers: Mapping[str, str]) -> float | None:
    """Seconds a response stays fresh (RFC 9111 §4.2.1): ``max-age`` less ``Age``, else
    ``Expires`` - ``Date``; 0 for ``no-store``/``no-cache`` or an invalid ``Expires``; None when
    the response says nothing about it."""
    directives = _cache_directives(headers.get("Cache-Control", ""))
    if "no-store" in directives or "no-cache" in directives:
        return 0.0
    max_age = delta_seconds(directives.get("max-age"))
    if max_age is not None:
        return max_age - (delta_seconds(headers.get("Age")) or 0.0)
    expires = headers.get("Expires")
    if expires is None:
        return None
    expires_at = http_date(expires)
    if expires_at is None:
        return 0.0  # RFC 9111 §5.3: an invalid Expires (e.g. "0") means already expired
    date = http_date(headers.get("Date", ""))
    return expires_at - (date if date is not None else time.time())


def _cache_directives(value: str) -> dict[str, str]:
    directives: dict[str, str] = {}
    for part in value.split(","):
        name, _, argument = part.strip().partition("=")
        if name:
            directives[name.lower()] = argument.strip().strip('"')
    return directives


def _parse_jwks(document: Any) -> dict[str, jwt.PyJWK]:
    keys: dict[str, jwt.PyJWK] = {}
    for entry in document.get("keys", []) if isinstance(document, dict) else []:
        kid, alg = entry.get("kid"), entry.get("alg")
        if not isinstance(kid, str) or alg not in ASYMMETRIC:
            continue  # keys without a kid or for algorithms we do not accept are ignored
        try:
            keys[kid] = jwt.PyJWK(entry, algorithm=alg)
        except jwt.PyJWTError:
            continue
    return keys


@dataclass(frozen=True, slots=True)
class _Verified:
    header: Mapping[str, Any]
    key: Any  # the key its signature verified with
    principal: Principal
    valid_from: float  # Unix time: nbf/iat less the leeway
    valid_until: float  # Unix time: exp plus the leeway (exclusive)


class VerifiedTokens:
    """Tokens whose signature and claims verified, by their exact text, for at most ``size``.

    Verifying a token again gives the same answer as long as the key it verified with is the
    same and the time is inside its validity window: the signature, issuer, audience and
    subject cannot change. So a hit skips PyJWT (about 0.1 ms per request) but is checked for
    both: the caller passes the key the token's header selects *now* (a rotated secret or a
    refetched JWKS fails the check and verifies in full), and the time is compared with the
    window exactly as PyJWT would (``exp``, ``nbf`` and ``iat`` with the leeway). Only tokens
    that verified are stored, so the size bounds legitimate callers, not an attacker's noise.
    """

    def __init__(self, size: int = VERIFIED_TOKENS, clock: Callable[[], float] = time.time) -> None:
        self._size = size
        self._clock = clock
        self._entries: dict[str, _Verified] = {}

    def header(self, token: str) -> Mapping[str, Any] | None:
        """The header of ``token`` if it is remembered (to select its key now)."""
        entry = self._entries.get(token)
        return entry.header if entry is not None else None

    def principal(self, token: str, key: Any) -> Principal | None:
        """The remembered principal, if ``token`` verified with ``key`` and is valid now."""
        entry = self._entries.get(token)
        if entry is None or not _same_key(entry.key, key):
            return None
        if entry.valid_from <= self._clock() < entry.valid_until:
            return entry.principal
        del self._entries[token]  # expired (or the clock moved back): verify in full
        return None

    def remember(
        self,
        token: str,
        header: Mapping[str, Any],
        key: Any,
        principal: Principal,
        leeway: float,
    ) -> None:
        """Store a token that just verified with ``key``."""
        claims = principal.claims
        valid_from = max(
            (int(claims[name]) for name in ("nbf", "iat") if claims.get(name) is not None),
            default=-math.inf,
        )
        entry = _Verified(header, key, principal, valid_from - leeway, int(claims["exp"]) + leeway)
        self._entries.pop(token, None)
        if len(self._entries) >= self._size:
            del self._entries[next(iter(self._entries))]
        self._entries[token] = entry


def _same_key(remembered: Any, current: Any) -> bool:
    # An HS256 key is bytes (compared by value); a JWKS key is the set's PyJWK object, new on
    # every fetch, so any refetch verifies in full once.
    if isinstance(remembered, bytes):
        return isinstance(current, bytes) and remembered == current
    return remembered is current


class TokenVerifier:
    """Verifies bearer tokens against the configured keys, claims and scopes."""

    def __init__(
        self,
        settings: AuthSettings,
        hs256_key: Callable[[], Awaitable[str]] | None,
        jwks: Jwks | None,
        verified: VerifiedTokens | None = None,
    ) -> None:
        self._settings = settings
        self._hs256_key = hs256_key
        self._jwks = jwks
        self._verified = verified if verified is not None else VerifiedTokens()

    async def verify(self, authorization: str | None, scope: str) -> Principal:
        """The caller behind an ``Authorization`` header, or AuthError (401/403)."""
        token = _bearer_token(authorization)
        principal = await self._remembered(token)
        if principal is None:
            header = _header(token)
            key = await self._key_for(header)
            claims = self._decode(token, key, header["alg"])
            principal = _principal(claims)
            self._verified.remember(token, header, key, principal, self._settings.leeway_seconds)
        if scope not in principal.scopes:
            raise AuthError(
                "insufficient_scope", f"the token lacks the scope {scope!r}", scope=scope
            )
        return principal

    async def _remembered(self, token: str) -> Principal | None:
        header = self._verified.header(token)
        if header is None:
            return None
        # The key the header selects now: a rotated secret or a refetched JWKS misses.
        return self._verified.principal(token, await self._key_for(header))

    async def _key_for(self, header: Mapping[str, Any]) -> Any:
        alg = header.get("alg")
        if alg == "HS256" and self._hs256_key is not None:
            return (await self._hs256_key()).encode()
        if alg in ASYMMETRIC and self._jwks is not None:
            kid = header.get("kid")
            if not isinstance(kid, str) or not kid or len(kid) > MAX_KID_LENGTH:
                raise AuthError("malformed", "the token header has no usable 'kid'")
            key = await self._jwks.key(kid)
            if key is None:
                raise AuthError("unknown_kid", "the token was signed with an unknown key")
            if key.algorithm_name != alg:
                raise AuthError("unsupported_alg", "the token's algorithm does not match its key")
            return key
        raise AuthError("unsupported_alg", f"tokens signed with {str(alg)[:16]!r} are not accepted")

    def _decode(self, token: str, key: Any, alg: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._settings.audience,
                issuer=self._settings.issuer,
                leeway=self._settings.leeway_seconds,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as exc:
            reason, detail = _classify(exc)
            raise AuthError(reason, detail) from None
        return claims


def _bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthError("missing", "an 'Authorization: Bearer <token>' header is required")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        raise AuthError("unsupported_scheme", "the Authorization header must be 'Bearer <token>'")
    if not token.strip():
        raise AuthError("malformed", "the Authorization header must be 'Bearer <token>'")
    if len(token) > MAX_TOKEN_BYTES:
        raise AuthError("oversized", f"the token is longer than {MAX_TOKEN_BYTES} bytes")
    return token.strip()


def _header(token: str) -> dict[str, Any]:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise AuthError("malformed", "the token is not a well-formed JWT") from None
    if not isinstance(header.get("alg"), str):
        raise AuthError("malformed", "the token header has no 'alg'")
    return header


_CLASSIFIED: tuple[tuple[type[jwt.PyJWTError], str, str], ...] = (
    (jwt.ExpiredSignatureError, "expired", "the token has expired"),
    (
        jwt.ImmatureSignatureError,
        "not_yet_valid",
        "the token is not valid yet (nbf/iat in the future)",
    ),
    (jwt.InvalidIssuerError, "wrong_issuer", "the token was issued by an unexpected issuer"),
    (jwt.InvalidAudienceError, "wrong_audience", "the token is meant for another audience"),
    (jwt.MissingRequiredClaimError, "missing_claim", "the token lacks a required claim"),
    (jwt.InvalidSignatureError, "bad_signature", "the token signature does not verify"),
    (jwt.InvalidAlgorithmError, "unsupported_alg", "the token's algorithm is not accepted"),
)


def _classify(exc: jwt.PyJWTError) -> tuple[str, str]:
    for kind, reason, detail in _CLASSIFIED:
        if isinstance(exc, kind):
            if isinstance(exc, jwt.MissingRequiredClaimError):
                return reason, f"the token lacks the required claim {exc.claim!r}"
            return reason, detail
    return "malformed", "the token could not be decoded"


def _principal(claims: Mapping[str, Any]) -> Principal:
    raw = claims.get("scope", claims.get("scp", ""))
    scopes = (
        raw.split()
        if isinstance(raw, str)
        else [s for s in raw if isinstance(s, str)]
        if isinstance(raw, list)
        else []
    )
    subject = claims["sub"]
    if not isinstance(subject, str) or not subject.strip():
        # Requests and their status records belong to the subject: an empty one owns nothing.
        raise AuthError("empty_subject", "the token's 'sub' claim is empty")
    return Principal(subject=subject, scopes=frozenset(scopes), claims=claims)


def issue_token(
    key: str, settings: AuthSettings, subject: str, scopes: list[str], lifetime_seconds: int = 3600
) -> str:
    """An HS256 token for development (``courier token``), valid for this deployment's iss/aud."""
    now = int(time.time())
    claims = {
        "iss": settings.issuer,
        "aud": settings.audience,
        "sub": subject,
        "scope": " ".join(scopes),
        "iat": now,
        "nbf": now,
        "exp": now + lifetime_seconds,
    }
    return jwt.encode(claims, key, algorithm="HS256")
