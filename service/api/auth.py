"""Bearer JWT verification: HS256 with a key from CredStash, RS256/ES256 with keys from a JWKS URL.

The algorithm in the token header only selects which *configured* key family may verify it:
HS256 is verified with the shared secret and nothing else, RS256/ES256 only with a JWKS key
of the same algorithm, and ``none`` or any other algorithm is refused. That closes
``alg: none`` and HS/RS confusion (an RSA public key used as an HMAC secret).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt

from .. import metrics
from ..errors import TransientError
from ..settings import AuthSettings
from .problems import Problem

log = logging.getLogger("courier.auth")

MAX_TOKEN_BYTES = 8192
MAX_KID_LENGTH = 128
ASYMMETRIC = {"RS256": "RSA", "ES256": "EC"}
REALM = 'Bearer realm="courier"'


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
    """Keys from a JWKS URL, cached; an unknown ``kid`` triggers at most one refetch per interval."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        min_refresh_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._url = url
        self._min_refresh = min_refresh_seconds
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._loaded = False
        self._lock = asyncio.Lock()

    async def key(self, kid: str) -> jwt.PyJWK | None:
        """The key with ``kid``, refetching the set if it is unknown and the interval allows."""
        if kid in self._keys:
            return self._keys[kid]
        async with self._lock:  # concurrent unknown kids share one fetch
            if kid not in self._keys and self._may_refresh():
                await self._fetch()
        if not self._loaded:
            # No fetch has succeeded yet: say "try later", not "your token is bad".
            raise TransientError("signing keys are unavailable (JWKS fetch failed)")
        return self._keys.get(kid)

    def _may_refresh(self) -> bool:
        return self._fetched_at is None or self._clock() - self._fetched_at >= self._min_refresh

    async def _fetch(self) -> None:
        self._fetched_at = self._clock()
        try:
            timeout = aiohttp.ClientTimeout(total=5)
            async with self._session.get(self._url, timeout=timeout) as response:
                response.raise_for_status()
                document = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning(
                "JWKS fetch failed",
                extra={"fields": {"event": "jwks_fetch_failed", "error": str(exc)}},
            )
            if not self._keys:
                raise TransientError("signing keys are unavailable (JWKS fetch failed)") from exc
            return
        self._keys = _parse_jwks(document)
        self._loaded = True
        log.info("JWKS loaded", extra={"fields": {"event": "jwks_loaded", "keys": len(self._keys)}})


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


class TokenVerifier:
    """Verifies bearer tokens against the configured keys, claims and scopes."""

    def __init__(
        self,
        settings: AuthSettings,
        hs256_key: Callable[[], Awaitable[str]] | None,
        jwks: Jwks | None,
    ) -> None:
        self._settings = settings
        self._hs256_key = hs256_key
        self._jwks = jwks

    async def verify(self, authorization: str | None, scope: str) -> Principal:
        """The caller behind an ``Authorization`` header, or AuthError (401/403)."""
        token = _bearer_token(authorization)
        header = _header(token)
        key = await self._key_for(header)
        claims = self._decode(token, key, header["alg"])
        principal = _principal(claims)
        if scope not in principal.scopes:
            raise AuthError(
                "insufficient_scope", f"the token lacks the scope {scope!r}", scope=scope
            )
        return principal

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
    return Principal(subject=str(claims["sub"]), scopes=frozenset(scopes), claims=claims)


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
