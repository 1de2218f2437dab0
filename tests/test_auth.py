"""TokenVerifier and Jwks against a real JWKS served over HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from courier_testkit.ports import free_port
from service.api.auth import (
    FAILED_FETCH_RETRY_SECONDS,
    AuthError,
    Jwks,
    Principal,
    TokenVerifier,
    VerifiedTokens,
)
from service.errors import SettingsError, TransientError
from service.settings import AuthSettings, load_settings

ISSUER = "https://issuer.test"
AUDIENCE = "courier-test"
HS256_SECRET = "hs256-secret-for-tests-0123456789abcdef"
REFRESH_SECONDS = 60.0
MAX_AGE_SECONDS = 300.0
REALM = 'Bearer realm="courier"'
INVALID = f'{REALM}, error="invalid_token"'

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ROTATED_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def public_jwk(private_key: Any, kid: str, alg: str) -> dict[str, Any]:
    """The public half of ``private_key`` as a JWK with ``kid`` and ``alg``."""
    if alg == "ES256":
        jwk = ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    else:
        jwk = RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims; an override of None removes the claim."""
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "client-1",
        "scope": "mailbox:create mailbox:read",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        **overrides,
    }
    return {k: v for k, v in base.items() if v is not None}


def rs256(kid: str = "rsa-1", key: Any = RSA_KEY, **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), key, algorithm="RS256", headers={"kid": kid})


def es256(kid: str = "ec-1", key: Any = EC_KEY, **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), key, algorithm="ES256", headers={"kid": kid})


def hs256(secret: str = HS256_SECRET, **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), secret, algorithm="HS256")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    """A JWT built by hand: PyJWT refuses to sign ``none`` with claims checks or HMAC with a PEM."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    if secret is None:
        return signing_input + "."
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def rsa_public_pem() -> bytes:
    return RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass
class JwksServer:
    """A JWKS endpoint whose key set and availability the test controls; counts its requests."""

    keys: list[dict[str, Any]] = field(
        default_factory=lambda: [
            public_jwk(RSA_KEY, "rsa-1", "RS256"),
            public_jwk(EC_KEY, "ec-1", "ES256"),
        ]
    )
    status: int = 200
    requests: int = 0
    url: str = ""
    headers: dict[str, str] = field(default_factory=dict)  # e.g. Cache-Control, Expires

    async def handle(self, _: web.Request) -> web.Response:
        self.requests += 1
        if self.status != 200:
            return web.json_response({"error": "down"}, status=self.status)
        return web.json_response({"keys": self.keys}, headers=self.headers)

    def rotate(self) -> None:
        """Remove ``rsa-1`` (RSA_KEY) from the set and publish ``rsa-2`` (ROTATED_RSA_KEY)."""
        self.keys = [
            public_jwk(ROTATED_RSA_KEY, "rsa-2", "RS256"),
            public_jwk(EC_KEY, "ec-1", "ES256"),
        ]


class FakeClock:
    """A monotonic clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", server.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
    try:
        yield server
    finally:
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def auth_settings(jwks_url: str = "") -> AuthSettings:
    return AuthSettings(
        issuer=ISSUER,
        audience=AUDIENCE,
        hs256_secret="courier.jwt.hs256",
        jwks_url=jwks_url,
        jwks_refresh_seconds=REFRESH_SECONDS,
        jwks_max_age_seconds=MAX_AGE_SECONDS,
        leeway_seconds=5,
    )


async def _hs256_key() -> str:
    return HS256_SECRET


@dataclass
class Verifiers:
    """A verifier with both key families, and one with the JWKS only."""

    both: TokenVerifier
    jwks_only: TokenVerifier
    jwks: Jwks


@pytest.fixture
def verifiers(
    jwks_server: JwksServer, session: aiohttp.ClientSession, clock: FakeClock
) -> Verifiers:
    jwks = Jwks(
        session, jwks_server.url, REFRESH_SECONDS, max_age_seconds=MAX_AGE_SECONDS, clock=clock
    )
    settings = auth_settings(jwks_server.url)
    return Verifiers(
        both=TokenVerifier(settings, _hs256_key, jwks),
        jwks_only=TokenVerifier(settings, None, jwks),
        jwks=jwks,
    )


async def rejected(
    verifier: TokenVerifier, authorization: str | None, scope: str = "mailbox:create"
) -> AuthError:
    with pytest.raises(AuthError) as caught:
        await verifier.verify(authorization, scope)
    return caught.value


def assert_401(error: AuthError, reason: str, detail: str, challenge: str = INVALID) -> None:
    assert error.reason == reason
    assert error.status == 401
    assert error.headers == {"WWW-Authenticate": challenge}
    assert error.body("req-1") == {
        "type": "urn:courier:problem:invalid-token",
        "title": "Unauthorized",
        "status": 401,
        "detail": detail,
        "request_id": "req-1",
    }


# --- accepted tokens -------------------------------------------------------------------------


async def test_rs256_token_from_the_jwks_is_accepted(
    verifiers: Verifiers, jwks_server: JwksServer
) -> None:
    principal = await verifiers.both.verify(f"Bearer {rs256()}", "mailbox:create")
    assert principal == Principal(
        subject="client-1",
        scopes=frozenset({"mailbox:create", "mailbox:read"}),
        claims=principal.claims,
    )
    assert principal.claims["iss"] == ISSUER
    assert jwks_server.requests == 1


async def test_es256_token_from_the_jwks_is_accepted(
    verifiers: Verifiers, jwks_server: JwksServer
) -> None:
    principal = await verifiers.both.verify(f"Bearer {es256()}", "mailbox:read")
    assert principal.subject == "client-1"
    assert jwks_server.requests == 1


async def test_hs256_token_is_accepted_and_keys_are_fetched_once(
    verifiers: Verifiers, jwks_server: JwksServer
) -> None:
    principal = await verifiers.both.verify(f"bearer {hs256()}", "mailbox:create")
    assert principal.subject == "client-1"
    for _ in range(3):
        await verifiers.both.verify(f"Bearer {rs256()}", "mailbox:create")
        await verifiers.both.verify(f"Bearer {es256()}", "mailbox:create")
    assert jwks_server.requests == 1  # HS256 needs no JWKS; the asymmetric keys are cached


async def test_scopes_may_be_a_scp_list(verifiers: Verifiers) -> None:
    token = rs256(scope=None, scp=["mailbox:read", 7])
    principal = await verifiers.both.verify(f"Bearer {token}", "mailbox:read")
    assert principal.scopes == frozenset({"mailbox:read"})


async def test_leeway_accepts_a_token_that_just_expired(verifiers: Verifiers) -> None:
    token = rs256(exp=int(time.time()) - 2)  # leeway is 5 s
    assert (await verifiers.both.verify(f"Bearer {token}", "mailbox:create")).subject


# --- rejected tokens -------------------------------------------------------------------------

REJECTED: list[tuple[str, Callable[[], str], str, str]] = [
    (
        "expired",
        lambda: rs256(exp=int(time.time()) - 3600),
        "expired",
        "the token has expired",
    ),
    (
        "not-yet-valid",
        lambda: rs256(nbf=int(time.time()) + 86400),
        "not_yet_valid",
        "the token is not valid yet (nbf/iat in the future)",
    ),
    (
        "wrong-issuer",
        lambda: rs256(iss="https://evil.test"),
        "wrong_issuer",
        "the token was issued by an unexpected issuer",
    ),
    (
        "wrong-audience",
        lambda: es256(aud="someone-else"),
        "wrong_audience",
        "the token is meant for another audience",
    ),
    (
        "bad-signature-rs256",
        lambda: rs256(key=OTHER_RSA_KEY),
        "bad_signature",
        "the token signature does not verify",
    ),
    (
        "bad-signature-hs256",
        lambda: hs256(secret="not-the-configured-secret-0123456789abcdef"),
        "bad_signature",
        "the token signature does not verify",
    ),
    (
        "tampered-payload",
        lambda: _tampered(rs256()),
        "bad_signature",
        "the token signature does not verify",
    ),
    (
        "hs-rs-confusion",
        lambda: hand_made(
            {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims(), rsa_public_pem()
        ),
        "bad_signature",
        "the token signature does not verify",
    ),
    (
        "alg-none",
        lambda: hand_made({"alg": "none", "typ": "JWT"}, claims(), None),
        "unsupported_alg",
        "tokens signed with 'none' are not accepted",
    ),
    (
        "alg-None-with-kid",
        lambda: hand_made({"alg": "None", "kid": "rsa-1"}, claims(), None),
        "unsupported_alg",
        "tokens signed with 'None' are not accepted",
    ),
    (
        "alg-HS512",
        lambda: jwt.encode(claims(), "k" * 64, algorithm="HS512"),
        "unsupported_alg",
        "tokens signed with 'HS512' are not accepted",
    ),
    (
        "unknown-kid",
        lambda: rs256(kid="nobody"),
        "unknown_kid",
        "the token was signed with an unknown key",
    ),
    (
        "rs256-claiming-an-ec-kid",
        lambda: rs256(kid="ec-1"),
        "unsupported_alg",
        "the token's algorithm does not match its key",
    ),
    (
        "es256-claiming-an-rsa-kid",
        lambda: es256(kid="rsa-1"),
        "unsupported_alg",
        "the token's algorithm does not match its key",
    ),
    (
        "rs256-without-kid",
        lambda: jwt.encode(claims(), RSA_KEY, algorithm="RS256"),
        "malformed",
        "the token header has no usable 'kid'",
    ),
    (
        "kid-too-long",
        lambda: rs256(kid="k" * 129),
        "malformed",
        "the token header has no usable 'kid'",
    ),
    (
        "header-without-alg",
        lambda: hand_made({"typ": "JWT"}, claims(), b"x"),
        "malformed",
        "the token header has no 'alg'",
    ),
    (
        "missing-sub",
        lambda: rs256(sub=None),
        "missing_claim",
        "the token lacks the required claim 'sub'",
    ),
    (
        "missing-exp",
        lambda: hs256(exp=None),
        "missing_claim",
        "the token lacks the required claim 'exp'",
    ),
    (
        "missing-iss",
        lambda: rs256(iss=None),
        "missing_claim",
        "the token lacks the required claim 'iss'",
    ),
    (
        "garbage-base64",
        lambda: "!!!.@@@.###",
        "malformed",
        "the token is not a well-formed JWT",
    ),
    (
        "not-a-jwt",
        lambda: "abc",
        "malformed",
        "the token is not a well-formed JWT",
    ),
    (
        "header-not-json",
        lambda: f"{_b64(b'not json')}.{_b64(b'{}')}.sig",
        "malformed",
        "the token is not a well-formed JWT",
    ),
    (
        "oversized",
        lambda: "a" * 9000,
        "oversized",
        "the token is longer than 8192 bytes",
    ),
]


def _tampered(token: str) -> str:
    header, _, signature = token.split(".")
    payload = _b64(json.dumps(claims(sub="admin")).encode())
    return f"{header}.{payload}.{signature}"


@pytest.mark.parametrize(
    ("make_token", "reason", "detail"),
    [pytest.param(make, reason, detail, id=name) for name, make, reason, detail in REJECTED],
)
async def test_rejected_token(
    verifiers: Verifiers, make_token: Callable[[], str], reason: str, detail: str
) -> None:
    error = await rejected(verifiers.both, f"Bearer {make_token()}")
    assert_401(error, reason, detail)


async def test_hs256_is_refused_when_only_the_jwks_is_configured(verifiers: Verifiers) -> None:
    # The HS/RS confusion token again, now with no HS256 key configured at all.
    token = hand_made({"alg": "HS256", "kid": "rsa-1"}, claims(), rsa_public_pem())
    error = await rejected(verifiers.jwks_only, f"Bearer {token}")
    assert_401(error, "unsupported_alg", "tokens signed with 'HS256' are not accepted")


async def test_rs256_is_refused_when_only_hs256_is_configured(
    jwks_server: JwksServer,
) -> None:
    verifier = TokenVerifier(auth_settings(), _hs256_key, None)
    error = await rejected(verifier, f"Bearer {rs256()}")
    assert_401(error, "unsupported_alg", "tokens signed with 'RS256' are not accepted")
    assert jwks_server.requests == 0


@pytest.mark.parametrize(
    ("authorization", "reason", "detail", "challenge"),
    [
        pytest.param(
            None,
            "missing",
            "an 'Authorization: Bearer <token>' header is required",
            REALM,
            id="missing",
        ),
        pytest.param(
            "",
            "missing",
            "an 'Authorization: Bearer <token>' header is required",
            REALM,
            id="empty",
        ),
        pytest.param(
            "Basic dXNlcjpwYXNz",
            "unsupported_scheme",
            "the Authorization header must be 'Bearer <token>'",
            REALM,
            id="basic",
        ),
        pytest.param(
            "Bearer ",
            "malformed",
            "the Authorization header must be 'Bearer <token>'",
            INVALID,
            id="bearer-without-token",
        ),
        pytest.param(
            "Token abc.def.ghi",
            "unsupported_scheme",
            "the Authorization header must be 'Bearer <token>'",
            REALM,
            id="other-scheme",
        ),
    ],
)
async def test_rejected_authorization_header(
    verifiers: Verifiers, authorization: str | None, reason: str, detail: str, challenge: str
) -> None:
    error = await rejected(verifiers.both, authorization)
    assert_401(error, reason, detail, challenge)


async def test_missing_scope_is_403_with_the_scope_in_the_challenge(verifiers: Verifiers) -> None:
    error = await rejected(verifiers.both, f"Bearer {rs256(scope='mailbox:read')}")
    assert error.reason == "insufficient_scope"
    assert error.status == 403
    assert error.headers == {
        "WWW-Authenticate": f'{REALM}, error="insufficient_scope", scope="mailbox:create"'
    }
    assert error.body("req-1") == {
        "type": "urn:courier:problem:insufficient-scope",
        "title": "Forbidden",
        "status": 403,
        "detail": "the token lacks the scope 'mailbox:create'",
        "request_id": "req-1",
    }


# --- the JWKS cache ---------------------------------------------------------------------------


async def test_unknown_kid_refetches_once_per_interval(
    verifiers: Verifiers, jwks_server: JwksServer, clock: FakeClock
) -> None:
    await verifiers.both.verify(f"Bearer {rs256()}", "mailbox:create")
    assert jwks_server.requests == 1
    clock.advance(REFRESH_SECONDS)
    assert_401(
        await rejected(verifiers.both, f"Bearer {rs256(kid='unknown-1')}"),
        "unknown_kid",
        "the token was signed with an unknown key",
    )
    assert jwks_server.requests == 2  # exactly one refetch for the unknown kid
    clock.advance(REFRESH_SECONDS - 1)
    await rejected(verifiers.both, f"Bearer {rs256(kid='unknown-2')}")
    await rejected(verifiers.both, f"Bearer {rs256(kid='unknown-1')}")
    assert jwks_server.requests == 2  # within the interval: no refetch however many unknown kids


async def test_concurrent_unknown_kids_share_one_fetch(
    verifiers: Verifiers, jwks_server: JwksServer
) -> None:
    tokens = [f"Bearer {rs256(kid=f'unknown-{i}')}" for i in range(5)] + [f"Bearer {rs256()}"]
    results = await asyncio.gather(
        *(verifiers.both.verify(token, "mailbox:create") for token in tokens),
        return_exceptions=True,
    )
    assert [type(r).__name__ for r in results] == ["AuthError"] * 5 + ["Principal"]
    assert jwks_server.requests == 1


async def test_rotated_key_is_picked_up_after_the_interval(
    verifiers: Verifiers, jwks_server: JwksServer, clock: FakeClock
) -> None:
    await verifiers.both.verify(f"Bearer {rs256()}", "mailbox:create")
    jwks_server.keys = [public_jwk(ROTATED_RSA_KEY, "rsa-2", "RS256")]
    rotated = f"Bearer {rs256(kid='rsa-2', key=ROTATED_RSA_KEY)}"
    await rejected(verifiers.both, rotated)  # too soon to refetch
    assert jwks_server.requests == 1
    clock.advance(REFRESH_SECONDS)
    principal = await verifiers.both.verify(rotated, "mailbox:create")
    assert principal.subject == "client-1"
    assert jwks_server.requests == 2
    # The old key left the set with the rotation.
    assert_401(
        await rejected(verifiers.both, f"Bearer {rs256()}"),
        "unknown_kid",
        "the token was signed with an unknown key",
    )


async def test_jwks_with_foreign_entries_keeps_only_usable_keys(
    verifiers: Verifiers, jwks_server: JwksServer
) -> None:
    jwks_server.keys = [
        {"kty": "oct", "k": _b64(b"secret"), "kid": "hmac", "alg": "HS256"},  # never from a JWKS
        {**public_jwk(RSA_KEY, "no-alg", "RS256"), "alg": None},
        {"kty": "RSA", "kid": "broken", "alg": "RS256", "n": "!!", "e": "AQAB"},
        public_jwk(RSA_KEY, "rsa-1", "RS256"),
    ]
    assert (await verifiers.both.verify(f"Bearer {rs256()}", "mailbox:create")).subject
    hmac_kid = hand_made({"alg": "HS256", "kid": "hmac"}, claims(), b"secret")
    assert (await rejected(verifiers.jwks_only, f"Bearer {hmac_kid}")).reason == "unsupported_alg"
    assert (await rejected(verifiers.both, f"Bearer {rs256(kid='broken')}")).reason == "unknown_kid"


async def test_jwks_down_with_no_cached_keys_is_transient(
    session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    url = f"http://127.0.0.1:{free_port()}/jwks.json"
    jwks = Jwks(session, url, REFRESH_SECONDS, max_age_seconds=MAX_AGE_SECONDS, clock=clock)
    verifier = TokenVerifier(auth_settings(url), _hs256_key, jwks)
    with pytest.raises(TransientError, match="signing keys are unavailable"):
        await verifier.verify(f"Bearer {rs256()}", "mailbox:create")
    # Still no keys within the refetch interval: still "try later", never "your token is bad".
    with pytest.raises(TransientError, match="signing keys are unavailable"):
        await verifier.verify(f"Bearer {rs256()}", "mailbox:create")
    # HS256 tokens do not depend on the JWKS at all.
    assert (await verifier.verify(f"Bearer {hs256()}", "mailbox:create")).subject


async def test_jwks_error_status_with_no_cached_keys_is_transient(
    verifiers: Verifiers, jwks_server: JwksServer, clock: FakeClock
) -> None:
    jwks_server.status = 503
    with pytest.raises(TransientError):
        await verifiers.both.verify(f"Bearer {es256()}", "mailbox:create")
    assert jwks_server.requests == 1
    with pytest.raises(TransientError):
        await verifiers.both.verify(f"Bearer {es256()}", "mailbox:create")
    assert jwks_server.requests == 1  # no hammering of a failing JWKS within the interval
    jwks_server.status = 200
    clock.advance(REFRESH_SECONDS)
    assert (await verifiers.both.verify(f"Bearer {es256()}", "mailbox:create")).subject
    assert jwks_server.requests == 2


async def test_jwks_down_keeps_serving_cached_keys(
    verifiers: Verifiers, jwks_server: JwksServer, clock: FakeClock
) -> None:
    await verifiers.both.verify(f"Bearer {rs256()}", "mailbox:create")
    jwks_server.status = 500
    clock.advance(REFRESH_SECONDS)
    assert (await rejected(verifiers.both, f"Bearer {rs256(kid='new')}")).reason == "unknown_kid"
    assert jwks_server.requests == 2
    assert (await verifiers.both.verify(f"Bearer {rs256()}", "mailbox:create")).subject
    assert (await verifiers.both.verify(f"Bearer {es256()}", "mailbox:create")).subject


# --- the JWKS cache expires: a key removed from the set stops working -----------------------

UNKNOWN_KID = "the token was signed with an unknown key"


def verify_rs256(verifier: TokenVerifier) -> Awaitable[Principal]:
    """Verify a token signed by ``rsa-1``, the key that JwksServer.rotate() removes."""
    return verifier.verify(f"Bearer {rs256()}", "mailbox:create")


def http_date(at: float) -> str:
    return email.utils.formatdate(at, usegmt=True)


async def test_removed_key_is_refused_once_the_configured_max_age_passes(
    verifiers: Verifiers, jwks_server: JwksServer, clock: FakeClock
) -> None:
    assert (await verify_rs256(verifiers.both)).subject
    jwks_server.rotate()
    clock.advance(MAX_AGE_SECONDS - 1)
    assert (await verify_rs256(verifiers.both)).subject  # still within the bound: cached
    assert jwks_server.requests == 1
    clock.advance(1)
    assert_401(await rejected(verifiers.both, f"Bearer {rs256()}"), "unknown_kid", UNKNOWN_KID)
    assert jwks_server.requests == 2
    rotated = f"Bearer {rs256(kid='rsa-2', key=ROTATED_RSA_KEY)}"
    assert (await verifiers.both.verify(rotated, "mailbox:create")).subject
    assert jwks_server.requests == 2  # the refetched set is fresh again


@pytest.mark.parametrize(
    ("headers", "lifetime"),
    [
        pytest.param({"Cache-Control": "public, max-age=10"}, 10.0, id="max-age"),
        pytest.param({"Cache-Control": "max-age=40", "Age": "30"}, 10.0, id="max-age-minus-age"),
        pytest.param({"Expires": 10.0}, 10.0, id="expires-minus-date"),
        pytest.param({"Cache-Control": "max-age=10", "Expires": 3600.0}, 10.0, id="max-age-wins"),
        pytest.param({"Cache-Control": "max-age=86400"}, MAX_AGE_SECONDS, id="bounded-by-max"),
        pytest.param({"Expires": "0"}, 1.0, id="invalid-expires-is-expired"),
        pytest.param({"Cache-Control": "no-cache"}, 1.0, id="no-cache"),
        pytest.param({"Cache-Control": "max-age=soon"}, MAX_AGE_SECONDS, id="unparsable"),
        # str.isdigit() accepts it and float() refuses it: a crash before the shared parser.
        pytest.param({"Cache-Control": "max-age=²"}, MAX_AGE_SECONDS, id="non-ascii-digits"),
    ],
)
async def test_jwks_cache_headers_set_the_lifetime_within_the_max_age(
    verifiers: Verifiers,
    jwks_server: JwksServer,
    clock: FakeClock,
    headers: dict[str, str | float],
    lifetime: float,
) -> None:
    # Expires given as a number is that many seconds after the response's Date.
    now = time.time()
    jwks_server.headers = {
        name: http_date(now + value) if isinstance(value, float) else value
        for name, value in headers.items()
    }
    if "Expires" in headers:
        jwks_server.headers["Date"] = http_date(now)
    assert (await verify_rs256(verifiers.both)).subject
    jwks_server.rotate()
    clock.advance(lifetime - 0.5)
    assert (await verify_rs256(verifiers.both)).subject
    assert jwks_server.requests == 1
    clock.advance(0.5)
    assert_401(await rejected(verifiers.both, f"Bearer {rs256()}"), "unknown_kid", UNKNOWN_KID)
    assert jwks_server.requests == 2


async def test_max_age_1_header_refuses_a_removed_key_within_seconds_on_the_real_clock(
    jwks_server: JwksServer, session: aiohttp.ClientSession
) -> None:
    jwks_server.headers = {"Cache-Control": "max-age=1"}
    jwks = Jwks(session, jwks_server.url, REFRESH_SECONDS, max_age_seconds=MAX_AGE_SECONDS)
    verifier = TokenVerifier(auth_settings(jwks_server.url), None, jwks)
    assert (await verify_rs256(verifier)).subject
    jwks_server.rotate()
    removed_at = time.monotonic()
    verifications = 0
    while True:
        verifications += 1
        try:
            await verify_rs256(verifier)
        except AuthError as error:
            assert_401(error, "unknown_kid", UNKNOWN_KID)
            break
        # Generous: the header says 1 s; the configured bound (300 s) must not apply.
        assert time.monotonic() - removed_at < 20, "the removed key is still accepted"
        await asyncio.sleep(0.05)
    assert verifications > 2
    assert jwks_server.requests <= 3  # one refetch per expiry, not one per verification


async def test_jwks_down_after_expiry_serves_cached_keys_for_a_bounded_grace(
    verifiers: Verifiers,
    jwks_server: JwksServer,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="courier.auth")
    assert (await verify_rs256(verifiers.both)).subject
    jwks_server.status = 500
    clock.advance(MAX_AGE_SECONDS)
    assert (await verify_rs256(verifiers.both)).subject  # stale, within the grace
    assert jwks_server.requests == 2
    assert (await verify_rs256(verifiers.both)).subject
    assert jwks_server.requests == 2  # a failed refetch is retried after a pause, not per call
    clock.advance(FAILED_FETCH_RETRY_SECONDS)
    assert (await verify_rs256(verifiers.both)).subject
    assert jwks_server.requests == 3
    stale = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "jwks_stale"]
    assert stale
    assert stale[0].levelno == logging.WARNING
    assert stale[0].fields["stale_seconds"] == 0  # type: ignore[attr-defined]
    assert stale[0].fields["grace_seconds"] == MAX_AGE_SECONDS  # type: ignore[attr-defined]
    clock.advance(MAX_AGE_SECONDS)  # past expiry + grace: the keys are no longer trusted
    with pytest.raises(TransientError, match="signing keys are unavailable"):
        await verify_rs256(verifiers.both)
    events = [getattr(r, "fields", {}).get("event") for r in caplog.records]
    assert "jwks_expired" in events
    assert (await verifiers.both.verify(f"Bearer {hs256()}", "mailbox:create")).subject
    jwks_server.status = 200
    clock.advance(FAILED_FETCH_RETRY_SECONDS)
    assert (await verify_rs256(verifiers.both)).subject  # back as soon as the JWKS answers


def test_jwks_max_age_is_a_validated_setting() -> None:
    assert AuthSettings().jwks_max_age_seconds == 300.0
    with pytest.raises(SettingsError, match=r"auth\.jwks_max_age_seconds"):
        load_settings(None, environ={"COURIER_AUTH_JWKS_MAX_AGE_SECONDS": "0"})
    loaded = load_settings(None, environ={"COURIER_AUTH_JWKS_MAX_AGE_SECONDS": "120"})
    assert loaded.auth.jwks_max_age_seconds == 120.0


# --- verified tokens remembered (VerifiedTokens) -----------------------------------------------


class CountingKey:
    """The HS256 key getter, counting calls and switchable to another secret (a rotation)."""

    def __init__(self) -> None:
        self.secret = HS256_SECRET
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        return self.secret


def _decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    decoded: list[str] = []
    original = jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        decoded.append(token)
        return original(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    return decoded


async def test_a_token_seen_before_is_not_decoded_again_but_its_scope_is_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decoded = _decodes(monkeypatch)
    verifier = TokenVerifier(auth_settings(), _hs256_key, None)
    token = hs256(scope="mailbox:read")
    first = await verifier.verify(f"Bearer {token}", "mailbox:read")
    second = await verifier.verify(f"Bearer {token}", "mailbox:read")
    assert first == second
    assert decoded == [token]
    error = await rejected(verifier, f"Bearer {token}", "mailbox:create")
    assert error.status == 403
    assert error.reason == "insufficient_scope"


async def test_a_remembered_token_is_refused_once_it_expires() -> None:
    # No leeway, so the token expires within the test.
    verifier = TokenVerifier(
        AuthSettings(issuer=ISSUER, audience=AUDIENCE, leeway_seconds=0), _hs256_key, None
    )
    token = f"Bearer {hs256(exp=int(time.time()) + 1)}"
    await verifier.verify(token, "mailbox:create")
    deadline = time.time() + 10
    while True:  # PyJWT and the memory both read the wall clock: wait for the expiry
        try:
            await verifier.verify(token, "mailbox:create")
        except AuthError as error:
            assert_401(error, "expired", "the token has expired")
            break
        assert time.time() < deadline
        await asyncio.sleep(0.2)


async def test_a_remembered_token_is_verified_again_after_the_key_rotates() -> None:
    key = CountingKey()
    verifier = TokenVerifier(auth_settings(), key, None)
    token = f"Bearer {hs256()}"
    await verifier.verify(token, "mailbox:create")
    await verifier.verify(token, "mailbox:create")
    assert key.calls == 2  # the key is still asked for on every request
    key.secret = "another-secret-after-rotation-0123456789"
    assert_401(
        await rejected(verifier, token), "bad_signature", "the token signature does not verify"
    )


async def test_a_token_not_yet_valid_is_never_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = _decodes(monkeypatch)
    verifier = TokenVerifier(auth_settings(), _hs256_key, None)
    token = hs256(nbf=int(time.time()) + 120)
    for _ in range(2):
        error = await rejected(verifier, f"Bearer {token}")
        assert error.reason == "not_yet_valid"
    assert decoded == [token, token]


def test_the_memory_is_bounded_and_honours_the_validity_window() -> None:
    now = [1000.0]
    memory = VerifiedTokens(size=2, clock=lambda: now[0])
    principal = Principal("s", frozenset(), {"exp": 1100, "nbf": 990, "iat": 995})
    for token in ("a", "b", "c"):
        memory.remember(token, {"alg": "HS256"}, b"k", principal, leeway=5)
    assert memory.header("a") is None  # the oldest was forgotten
    assert memory.principal("b", b"k") is principal
    assert memory.principal("b", b"other") is None  # another key: verify in full
    now[0] = 990.0  # the later of nbf and iat, less the leeway: PyJWT accepts from here on
    assert memory.principal("b", b"k") is principal
    now[0] = 989.9
    assert memory.principal("b", b"k") is None
    now[0] = 1104.9
    assert memory.principal("c", b"k") is principal
    now[0] = 1105.0  # exp plus the leeway: PyJWT refuses from here on
    assert memory.principal("c", b"k") is None
    assert memory.header("c") is None
