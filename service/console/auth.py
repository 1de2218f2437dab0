"""Console sign-in: a ``mailbox:admin`` token pasted once, kept server-side; CSRF on POSTs.

- Tokens are verified by the API's own ``TokenVerifier`` (same keys, issuer, audience and
  leeway) on every request, so an expired or revoked-key token stops working at once.
- The cookie holds an opaque random session id, never the token: browsers send a cookie of
  127.0.0.1 to every port of it (the API, stubs, any local server during an SSM forward), and
  any of those can set one. The token stays in this process (``Sessions``: bounded, pruned).
  The cookie is HttpOnly, SameSite=Strict, Path=/ and no longer than the token's ``exp``; the
  console serves plain HTTP on loopback (reached through SSM), so it is never Secure.
- Every POST but the login carries ``csrf`` = HMAC(per-process key, session id): a request without
  it, or with another one, gets 403 before any handler runs. The login form itself uses a
  double-submit nonce (a short-lived cookie equal to its hidden field), since there is no
  session yet to bind to.
- A page asked for without a valid admin token gets the login page with 401 (403 when the
  token verifies but lacks the scope); the chart's JSON gets a JSON 401.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
import unicodedata
import urllib.parse
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import aiohttp_jinja2
from aiohttp import web

from ..api.auth import MAX_TOKEN_BYTES, AuthError, Principal
from ..errors import CourierError
from .keys import CSRF, CSRF_KEY, PRINCIPAL, SESSION, SESSIONS, VERIFIER

log = logging.getLogger("courier.console")

ADMIN_SCOPE = "mailbox:admin"
# Seeing personal fields of a decrypted event: a separate scope, and audit-logged.
UNMASK_SCOPE = "mailbox:admin-unmask"
COOKIE = "courier_console"
LOGIN_COOKIE = "courier_console_login"
LOGIN_NONCE_SECONDS = 600
# The pasted token: the API's own bound (the cookie holds only the session id now).
MAX_TOKEN_CHARS = MAX_TOKEN_BYTES
MAX_SESSIONS = 1000
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Sessions:
    """Signed-in sessions of this process: opaque id -> (token, expiry), oldest evicted."""

    def __init__(self, limit: int = MAX_SESSIONS) -> None:
        self._limit = limit
        self._by_id: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_id)

    def open(self, token: str, expires_at: float) -> str:
        """A new session id for ``token`` (kept until ``expires_at``, epoch seconds)."""
        now = time.time()
        for stale in [sid for sid, (_, end) in self._by_id.items() if end <= now]:
            del self._by_id[stale]
        while len(self._by_id) >= self._limit:
            self._by_id.popitem(last=False)
        session_id = secrets.token_urlsafe(32)
        self._by_id[session_id] = (token, expires_at)
        return session_id

    def token(self, session_id: str) -> str | None:
        """The token of a live session; None for an unknown or expired one."""
        found = self._by_id.get(session_id)
        if found is None or found[1] <= time.time():
            return None
        return found[0]

    def close(self, session_id: str) -> None:
        """Forget a session (sign-out)."""
        self._by_id.pop(session_id, None)


def session_token(request: web.Request) -> str:
    """The token of the request's session ("" when it has none)."""
    session_id = request.cookies.get(COOKIE, "")
    return (request.app[SESSIONS].token(session_id) if session_id else None) or ""


def csrf_token(key: bytes, session_id: str) -> str:
    """The CSRF token of a session: bound to its id, unforgeable without the process key."""
    return hmac.new(key, session_id.encode(), hashlib.sha256).hexdigest()[:40]


def _public(request: web.Request) -> bool:
    return request.path in ("/login", "/favicon.ico") or request.path.startswith("/static/")


@web.middleware
async def require_admin(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every page but the login page needs an admin token; every POST its CSRF token."""
    if _public(request):
        return await handler(request)
    session_id = request.cookies.get(COOKIE, "")
    try:
        principal = await verify(request, session_token(request))
    except AuthError as exc:
        # No session at all is a first visit, not an error to show.
        return _refused(request, exc.status, "" if exc.reason == "missing" else exc.detail)
    except CourierError as exc:
        # The signing key cannot be read (store down, secret missing): not the person's fault.
        return _refused(request, 503, f"tokens cannot be verified now: {type(exc).__name__}")
    request[PRINCIPAL] = principal
    request[SESSION] = session_id
    request[CSRF] = csrf_token(request.app[CSRF_KEY], session_id)
    if request.method not in ("GET", "HEAD"):
        form = await request.post()
        if not hmac.compare_digest(str(form.get("csrf", "")), request[CSRF]):
            return _forbidden(request, "the form's CSRF token is missing or wrong: reload the page")
    return await handler(request)


async def verify(request: web.Request, token: str, scope: str = ADMIN_SCOPE) -> Principal:
    """The principal of ``token`` if it holds ``scope``; AuthError otherwise."""
    header = f"Bearer {token}" if token else None
    return await request.app[VERIFIER].verify(header, scope)


def _refused(request: web.Request, status: int, detail: str) -> web.StreamResponse:
    if request.path.endswith(".json"):
        return web.json_response({"error": detail}, status=status)
    if "." in request.path.rsplit("/", 1)[-1]:
        # Not a page (a file a browser asks for on its own): a login page here would replace
        # the sign-in nonce of the page the person is looking at.
        return web.Response(status=status, text=detail)
    if request.method not in ("GET", "HEAD"):
        return _forbidden(request, detail, status)
    return login_page(request, status, detail)


def _forbidden(request: web.Request, detail: str, status: int = 403) -> web.StreamResponse:
    return aiohttp_jinja2.render_template(
        "error.html", request, {"status": status, "detail": detail}, status=status
    )


def login_page(request: web.Request, status: int = 200, detail: str = "") -> web.StreamResponse:
    """The sign-in form, with a fresh double-submit nonce."""
    nonce = secrets.token_urlsafe(24)
    response = aiohttp_jinja2.render_template(
        "login.html",
        request,
        {"csrf": nonce, "detail": detail, "next": _next_path(request.path_qs)},
        status=status,
    )
    response.set_cookie(
        LOGIN_COOKIE,
        nonce,
        max_age=LOGIN_NONCE_SECONDS,
        path="/login",
        httponly=True,
        samesite="Strict",
    )
    return response


def _next_path(path: str) -> str:
    # Only a path on this console: never an absolute or scheme-relative URL (open redirect).
    # Browsers drop tabs and newlines from a URL and read a backslash as a slash, so
    # "/\t/host" and "/\\host" would both be "//host": refuse any of them outright.
    if any(char.isspace() or unicodedata.category(char).startswith("C") for char in path):
        return "/"
    if not path.startswith("/") or path.startswith(("//", "/\\")) or "\\" in path:
        return "/"
    parts = urllib.parse.urlsplit(path)
    return "/" if parts.scheme or parts.netloc else path


async def login_form(request: web.Request) -> web.StreamResponse:
    """GET /login."""
    return login_page(request)


async def login(request: web.Request) -> web.StreamResponse:
    """POST /login: check the nonce, verify the token, keep it in the session cookie."""
    form = await request.post()
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    if not nonce or not hmac.compare_digest(str(form.get("csrf", "")), nonce):
        return _forbidden(request, "the sign-in form expired or was not this console's: reload")
    token = str(form.get("token", "")).strip()
    if not token:
        return login_page(request, 401, "paste a token first")
    if len(token) > MAX_TOKEN_CHARS:
        return login_page(request, 401, "that token is too long")
    try:
        principal = await verify(request, token)
    except CourierError as exc:
        return login_page(request, 503, f"tokens cannot be verified now: {type(exc).__name__}")
    except AuthError as exc:
        log.info(
            "console sign-in refused",
            extra={"fields": {"event": "console_login_refused", "reason": exc.reason}},
        )
        return login_page(request, exc.status, exc.detail)
    target = _next_path(str(form.get("next", "/")))
    response = see_other("/" if target.startswith("/login") else target)
    expires_at = float(principal.claims.get("exp", 0))
    session_id = request.app[SESSIONS].open(token, expires_at)
    response.set_cookie(
        COOKIE,
        session_id,
        max_age=max(int(expires_at - time.time()), 1),
        path="/",
        httponly=True,
        samesite="Strict",
    )
    response.del_cookie(LOGIN_COOKIE, path="/login")
    audit(principal, "login")
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    """POST /logout: forget the session, here and in the browser."""
    request.app[SESSIONS].close(request[SESSION])
    response = see_other("/login")
    response.del_cookie(COOKIE, path="/")
    audit(request[PRINCIPAL], "sign_out")
    return response


def see_other(location: str) -> web.Response:
    """303 to ``location`` (a path on this console)."""
    return web.Response(status=303, headers={"Location": location})


def audit(principal: Principal, what: str, **fields: object) -> None:
    """One ``console_audit`` JSON log line: who (the token's subject), what, and the rest."""
    log.info(
        "console %s by %s",
        what,
        principal.subject,
        extra={
            "fields": {"event": "console_audit", "who": principal.subject, "what": what, **fields}
        },
    )


async def favicon(_: web.Request) -> web.Response:
    """GET /favicon.ico: none (browsers ask on their own)."""
    return web.Response(status=204)


def setup(app: web.Application) -> None:
    """The sign-in routes."""
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
