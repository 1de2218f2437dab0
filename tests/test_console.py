"""The operator console over HTTP (``service/console/``), against a real courier and moto.

A courier with ``role = api`` (no worker: what a replay puts on the work queue stays there to
be counted) serves the console on a port of its own. Requests go through a plain aiohttp
client that keeps the console's cookie, as a browser would; the browser itself is
``tests/test_console_browser.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from courier_testkit.proxy import Proxy, listening
from courier_testkit.tokens import mint_token
from service import daemon
from service.aws import AwsClients
from service.bootstrap import Resources
from service.console.actions import CLOSE_SECONDS
from service.console.app import CONTENT_SECURITY_POLICY
from service.console.auth import ADMIN_SCOPE as ADMIN
from service.console.auth import UNMASK_SCOPE as UNMASK
from service.envelope import EnvelopeCipher
from service.operations import create_mailbox
from service.secrets.credstash import CredStash
from service.settings import ConsoleSettings, Settings
from service.state import SETTINGS, STATUS
from service.status import RequestState, StatusRecord, now_iso
from tests.chain import plant, receive_all
from tests.conftest import DEMO_SECRETS
from tests.test_replay import dead_letter, depth

CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')
# (reason, target, op) -> how many of each kind are planted
PLANTED = {
    ("target_rejected", "crm", "create-mailbox"): 3,
    ("undecryptable", "", "create-mailbox"): 2,
    ("unknown_op", "", "delete-everything"): 1,
}
PERSON = {
    "username": "jane.doe",
    "display_name": "Jane Doe",
    "plan": "standard",
    "contact_email": "jane.doe@example.com",
    "msisdn": "+447700900123",
}


def token(*scopes: str, subject: str = "operator", **claims: Any) -> str:
    return mint_token(DEMO_SECRETS["courier.jwt.hs256"], scopes=scopes, subject=subject, **claims)


def console_settings(settings: Settings, **changes: Any) -> Settings:
    """An API-only courier on free ports with its console on."""
    defaults: dict[str, Any] = {
        "role": "api",
        "http": dataclasses.replace(settings.http, port=0, drain_seconds=1),
        "console": ConsoleSettings(enabled=True, port=0, sample_seconds=1),
    }
    return settings.replace(**{**defaults, **changes})


def csrf_of(html: str) -> str:
    found = CSRF_FIELD.search(html)
    assert found, f"the page has no CSRF field: {html[:300]}"
    return found.group(1)


@dataclass
class Console:
    """A running courier's console and a client that keeps its cookie, as a browser does."""

    url: str
    http: aiohttp.ClientSession
    app: web.Application
    api_url: str = ""

    @property
    def settings(self) -> Settings:
        return self.app[SETTINGS]

    async def log_in(self, the_token: str) -> tuple[int, str, str]:
        """Paste ``the_token`` into the login form: status, body and Set-Cookie header."""
        async with self.http.get(f"{self.url}/login") as page:
            nonce = csrf_of(await page.text())
        async with self.http.post(
            f"{self.url}/login",
            data={"token": the_token, "csrf": nonce, "next": "/"},
            allow_redirects=False,
        ) as response:
            cookies = "; ".join(response.headers.getall("Set-Cookie", []))
            return response.status, await response.text(), cookies

    async def page(self, path: str, status: int = 200) -> str:
        async with self.http.get(f"{self.url}{path}", allow_redirects=False) as response:
            text = await response.text()
            assert response.status == status, (path, response.status, text[:800])
            return text

    async def submit(self, page: str, path: str, **data: Any) -> tuple[int, str]:
        """POST a form from ``page`` (with its CSRF token); the status and the page it led to."""
        fields = {"csrf": csrf_of(await self.page(page)), **data}
        async with self.http.post(f"{self.url}{path}", data=fields) as response:
            return response.status, await response.text()


@contextlib.asynccontextmanager
async def running_console(settings: Settings, **changes: Any) -> AsyncIterator[Console]:
    async with (
        daemon.serving(console_settings(settings, **changes)) as listening,
        aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http,
    ):
        assert listening.console_url is not None
        yield Console(listening.console_url, http, listening.app, listening.url)


@pytest.fixture
async def console(settings: Settings) -> AsyncIterator[Console]:
    async with running_console(settings) as running:
        yield running


@pytest.fixture
async def admin(console: Console) -> Console:
    status, _, _ = await console.log_in(token(ADMIN))
    assert status == 303
    return console


async def plant_dead_letters(aws: AwsClients, dlq_url: str) -> None:
    """PLANTED in the DLQ, as the worker leaves dead letters."""
    for (reason, target, op), count in PLANTED.items():
        for _ in range(count):
            request_id = uuid.uuid4().hex
            attributes = {"op": op, "request_id": request_id, "dlq": dead_letter(reason, target)}
            await plant(aws, dlq_url, f"sealed-{request_id}", attributes)


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        fields
        for record in caplog.records
        if (fields := getattr(record, "fields", {})).get("event") == "console_audit"
    ]


def action_result(html: str) -> dict[str, str]:
    """The data attributes of the page's ``#action-result``."""
    found = re.search(r'<div id="action-result"([^>]*)>', html) or re.search(
        r'<p[^>]*id="action-result"([^>]*)>', html
    )
    assert found, html[:800]
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', found.group(1)))


# --- signing in ---------------------------------------------------------------------------------


async def test_a_missing_or_wrong_token_gets_the_login_page(console: Console) -> None:
    for path in ("/", "/dead-letters", "/secrets"):
        page = await console.page(path, status=401)
        assert 'id="token"' in page
        assert 'id="login"' in page
        assert 'id="nav-overview"' not in page
    console.http.cookie_jar.update_cookies({"courier_console": "not-a-token"})
    assert 'id="token"' in await console.page("/", status=401)

    status, page, cookies = await console.log_in("not-a-token")
    assert (status, "courier_console=" in cookies) == (401, False)
    assert 'id="token"' in page
    status, page, cookies = await console.log_in(token("mailbox:create", "mailbox:read"))
    assert (status, "courier_console=" in cookies) == (403, False)
    assert ADMIN in page
    status, page, cookies = await console.log_in(token(ADMIN, exp=1))  # expired
    assert status == 401


async def test_the_chart_json_answers_401_without_a_token(console: Console) -> None:
    async with console.http.get(f"{console.url}/overview.json") as response:
        assert response.status == 401
        assert "error" in await response.json()


async def test_an_admin_token_is_kept_in_a_strict_cookie(console: Console) -> None:
    status, _, cookies = await console.log_in(token(ADMIN))
    assert status == 303
    session = next(c for c in cookies.split(", ") if "courier_console=" in c).lower()
    for attribute in ("httponly", "samesite=strict", "path=/", "max-age="):
        assert attribute in session, session
    assert "secure" not in session.replace("samesite", "")  # plain HTTP: no Secure flag
    max_age = int(re.search(r"max-age=(\d+)", session).group(1))  # type: ignore[union-attr]
    assert 0 < max_age <= 3600  # no longer than the token
    page = await console.page("/")
    for nav in ("overview", "targets", "dead-letters", "requests", "secrets"):
        assert f'id="nav-{nav}"' in page
    assert 'id="throughput-chart"' in page


async def test_the_login_form_needs_its_own_nonce(console: Console) -> None:
    async with console.http.post(
        f"{console.url}/login", data={"token": token(ADMIN)}, allow_redirects=False
    ) as response:
        assert response.status == 403
        assert "courier_console=" not in "".join(response.headers.getall("Set-Cookie", []))


async def test_sign_out_forgets_the_cookie(
    admin: Console, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="courier.console")
    session = next(c.value for c in admin.http.cookie_jar if c.key == "courier_console")
    status, page = await admin.submit("/", "/logout")
    assert status == 200
    assert 'id="token"' in page
    await admin.page("/", status=401)
    # The server forgets the session too: a copy of the old cookie opens nothing.
    admin.http.cookie_jar.update_cookies({"courier_console": session})
    await admin.page("/", status=401)
    assert [a["who"] for a in audit_lines(caplog) if a["what"] == "sign_out"] == ["operator"]


async def test_the_cookie_holds_a_session_id_never_the_token(console: Console) -> None:
    """Other local servers on 127.0.0.1 see the console's cookie: it must not be the token."""
    the_token = token(ADMIN)
    status, _, cookies = await console.log_in(the_token)
    assert status == 303
    assert the_token not in cookies
    session = next(c.value for c in console.http.cookie_jar if c.key == "courier_console")
    assert len(session) >= 43  # 32 random bytes
    assert "." not in session  # not a JWT
    await console.page("/")
    # A cookie set by anyone else (another port, the token itself, a guess) opens nothing.
    console.http.cookie_jar.clear()
    console.http.cookie_jar.update_cookies({"courier_console": the_token})
    await console.page("/", status=401)


async def test_a_session_stops_when_its_token_expires(console: Console) -> None:
    import time

    status, _, _ = await console.log_in(token(ADMIN, exp=int(time.time()) + 2))
    assert status == 303
    await console.page("/")
    for _ in range(100):  # the token's exp (plus the verifier's leeway) passes
        async with console.http.get(f"{console.url}/", allow_redirects=False) as response:
            if response.status == 401:
                break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError("the session outlived its token")


async def test_tokens_that_cannot_be_verified_now_get_503(
    settings: Settings, aws: AwsClients, resources: Resources
) -> None:
    """The HS256 key cannot be read (its CredStash secret is gone): 503 with the reason, not a
    401 asking the person to sign in again, since it is not their token's fault."""
    name = f"console.jwt.{uuid.uuid4().hex}"
    store = CredStash(aws.dynamodb, aws.kms, resources.secrets_table)
    version = await store.put(
        name, DEMO_SECRETS["courier.jwt.hs256"], kms_key=resources.credstash_key_arn
    )
    changes = {
        "auth": dataclasses.replace(settings.auth, hs256_secret=name),
        # Every use reads the store: the deletion below shows at once.
        "secrets": dataclasses.replace(settings.secrets, cache_enabled=False),
    }
    async with running_console(settings, **changes) as console:
        assert (await console.log_in(token(ADMIN)))[0] == 303
        await console.page("/")
        await aws.dynamodb.delete_item(
            TableName=resources.secrets_table,
            Key={"name": {"S": name}, "version": {"S": version}},
        )
        reason = "tokens cannot be verified now: SecretNotFoundError"
        page = await console.page("/", status=503)
        assert f'id="login-error">{reason}<' in page
        async with console.http.get(f"{console.url}/overview.json") as response:
            assert (response.status, await response.json()) == (503, {"error": reason})
        status, page, cookies = await console.log_in(token(ADMIN))
        assert (status, "courier_console=" in cookies) == (503, False)
        assert f'id="login-error">{reason}<' in page


def test_sessions_are_bounded_and_pruned() -> None:
    from service.console.auth import Sessions

    sessions = Sessions(limit=3)
    ids = [sessions.open(f"token-{n}", expires_at=10_000_000_000.0) for n in range(4)]
    assert sessions.token(ids[0]) is None  # the oldest made room
    assert [sessions.token(i) for i in ids[1:]] == ["token-1", "token-2", "token-3"]
    expired = sessions.open("old", expires_at=1.0)
    assert sessions.token(expired) is None
    sessions.open("new", expires_at=10_000_000_000.0)
    assert len(sessions) == 3


async def test_another_host_name_is_refused(console: Console) -> None:
    """DNS rebinding: evil.example resolving to 127.0.0.1 reaches the port, not the console."""
    port = console.url.rsplit(":", 1)[1]
    for host in (f"evil.example:{port}", "evil.example", "127.0.0.1.evil.example"):
        async with console.http.get(
            f"{console.url}/login", headers={"Host": host}, allow_redirects=False
        ) as response:
            assert response.status == 421, host
            assert 'id="token"' not in await response.text()
    # Its own name, with any port (an SSM forward may use another local port).
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost:19300"):
        async with console.http.get(f"{console.url}/login", headers={"Host": host}) as response:
            assert response.status == 200, host


async def test_a_first_visit_shows_no_error(console: Console) -> None:
    for path in ("/", "/login"):
        page = await console.page(path, status=401 if path == "/" else 200)
        assert 'id="token"' in page
        assert 'id="login-error"' not in page
        assert "Authorization" not in page
    console.http.cookie_jar.update_cookies({"courier_console": "no-such-session"})
    assert 'id="login-error"' not in await console.page("/", status=401)
    status, page, _ = await console.log_in("not-a-token")
    assert status == 401
    assert 'id="login-error"' in page


# --- headers and CSRF ---------------------------------------------------------------------------


async def test_every_response_carries_a_strict_content_security_policy(admin: Console) -> None:
    for path, status in (
        ("/login", 200),
        ("/", 200),
        ("/dead-letters", 200),
        ("/static/console.js", 200),
        ("/static/console.css", 200),
        ("/no-such-page", 404),
    ):
        async with admin.http.get(f"{admin.url}{path}", allow_redirects=False) as response:
            body = await response.text()
            assert response.status == status, path
            assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            if path.startswith("/static/"):
                continue
            # What the policy would block anyway: never written in the first place.
            assert not re.search(r"<script(?![^>]*\bsrc=)", body), path
            assert not re.search(r"<style|\sstyle=|\son[a-z]+=", body), path
    assert "default-src 'self'" in CONTENT_SECURITY_POLICY
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY


async def test_a_post_without_the_csrf_token_gets_403(
    admin: Console, aws: AwsClients, fresh: Resources
) -> None:
    await plant_dead_letters(aws, fresh.dlq_url)
    discard = {"expected": "6", "confirm": "discard 6"}
    for fields in (discard, {**discard, "csrf": "forged"}):
        async with admin.http.post(f"{admin.url}/dead-letters/discard", data=fields) as response:
            assert response.status == 403
    async with admin.http.post(f"{admin.url}/logout") as response:
        assert response.status == 403
    assert await depth(aws, fresh.dlq_url) == (6, 0)


# --- dead letters -------------------------------------------------------------------------------


async def test_dead_letters_are_grouped_by_reason_target_and_op(
    admin: Console, aws: AwsClients, fresh: Resources
) -> None:
    await plant_dead_letters(aws, fresh.dlq_url)
    page = await admin.page("/dead-letters")
    rows = re.findall(
        r'<tr class="dlq-group" data-reason="([^"]*)" data-target="([^"]*)" data-op="([^"]*)"'
        r' data-count="(\d+)"',
        page,
    )
    assert {(r, t, o): int(n) for r, t, o, n in rows} == PLANTED
    assert 'id="dlq-groups"' in page
    # Each group links to its filtered list, whose rows link to their message pages.
    link = re.search(r'href="(/dead-letters/messages\?reason=target_rejected[^"]*)"', page)
    assert link
    listing = await admin.page(link.group(1).replace("&amp;", "&"))
    assert len(re.findall(r'<tr class="dlq-message"', listing)) == 3
    assert len(re.findall(r'href="/dead-letters/messages/[^"]+"', listing)) == 3
    assert await depth(aws, fresh.dlq_url) == (6, 0)  # reading released every message


async def test_a_dry_run_moves_nothing(
    admin: Console, aws: AwsClients, fresh: Resources, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="courier.console")
    await plant_dead_letters(aws, fresh.dlq_url)
    status, page = await admin.submit(
        "/dead-letters/messages?reason=target_rejected",
        "/dead-letters/replay",
        reason="target_rejected",
        dry_run="1",
        rate="100",
    )
    assert status == 200
    result = action_result(page)
    assert (result["state"], result["dry-run"], result["chosen"], result["moved"]) == (
        "done",
        "true",
        "3",
        "0",
    )
    assert "would move <strong>3</strong>" in page
    assert await depth(aws, fresh.queue_url) == (0, 0)
    assert await depth(aws, fresh.dlq_url) == (6, 0)
    [line] = [a for a in audit_lines(caplog) if a["what"] == "replay"]
    assert (line["who"], line["dry_run"], line["count"]) == ("operator", True, 3)
    assert line["filter"] == {"reason": "target_rejected"}


async def test_replay_moves_a_group_to_the_work_queue_and_audits_it(
    admin: Console, aws: AwsClients, fresh: Resources, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="courier.console")
    await plant_dead_letters(aws, fresh.dlq_url)
    status, page = await admin.submit(
        "/dead-letters/messages?reason=target_rejected&target=crm",
        "/dead-letters/replay",
        reason="target_rejected",
        target="crm",
        op="create-mailbox",
        rate="100",
    )
    assert status == 200
    result = action_result(page)
    assert (result["state"], result["moved"], result["failed"]) == ("done", "3", "0")
    copies = await receive_all(aws, fresh.queue_url)
    assert len(copies) == 3
    assert all(c["MessageAttributes"]["replayed"]["StringValue"] == "1" for c in copies)
    assert await depth(aws, fresh.dlq_url) == (3, 0)
    [line] = [a for a in audit_lines(caplog) if a["what"] == "replay"]
    assert (line["who"], line["count"], line["dry_run"]) == ("operator", 3, False)
    assert line["filter"] == {"reason": "target_rejected", "target": "crm", "op": "create-mailbox"}
    # The groups page reads the DLQ again after the action.
    page = await admin.page("/dead-letters")
    assert 'data-reason="target_rejected"' not in page


async def test_replay_of_picked_messages_moves_only_those(
    admin: Console, aws: AwsClients, fresh: Resources
) -> None:
    await plant_dead_letters(aws, fresh.dlq_url)
    listing = await admin.page("/dead-letters/messages?reason=undecryptable")
    picked = re.findall(r'name="id" value="([^"]+)" form="replay-form"', listing)[:1]
    _status, page = await admin.submit(
        "/dead-letters/messages", "/dead-letters/replay", id=picked[0], rate="100"
    )
    assert action_result(page)["moved"] == "1"
    assert await depth(aws, fresh.dlq_url) == (5, 0)


async def test_a_dlq_copy_stays_when_the_work_queue_does_not_take_the_replay(
    settings: Settings, aws: AwsClients, fresh: Resources
) -> None:
    await plant_dead_letters(aws, fresh.dlq_url)
    missing = fresh.queue_url.rsplit("/", 1)[0] + f"/no-such-queue-{uuid.uuid4().hex[:8]}"
    queue = dataclasses.replace(settings.queue, url=missing)
    async with running_console(settings, queue=queue) as console:
        assert (await console.log_in(token(ADMIN)))[0] == 303
        _status, page = await console.submit(
            "/dead-letters", "/dead-letters/replay", reason="undecryptable", rate="100"
        )
    result = action_result(page)
    assert (result["state"], result["moved"], result["failed"]) == ("done", "0", "2")
    visible, in_flight = await depth(aws, fresh.dlq_url)
    assert visible + in_flight == 6  # nothing was deleted: the send came first, and failed


async def test_discard_needs_the_typed_confirmation(
    admin: Console, aws: AwsClients, fresh: Resources, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="courier.console")
    await plant_dead_letters(aws, fresh.dlq_url)
    group = "/dead-letters/messages?reason=undecryptable"
    listing = await admin.page(group)
    assert 'placeholder="discard 2"' in listing
    for confirm in ("", "discard", "discard 6", "DISCARD 2"):
        status, page = await admin.submit(
            group, "/dead-letters/discard", reason="undecryptable", expected="2", confirm=confirm
        )
        assert status == 400, confirm
        assert action_result(page)["state"] == "refused"
    assert await depth(aws, fresh.dlq_url) == (6, 0)

    shown = re.findall(r'type="hidden" name="id" value="([^"]+)"', listing)  # the form's ids
    fields = {"reason": "undecryptable", "expected": "2", "confirm": "discard 2", "id": shown}
    status, page = await admin.submit(group, "/dead-letters/discard", **fields)
    result = action_result(page)
    assert (status, result["state"], result["moved"]) == (200, "done", "2")
    assert await depth(aws, fresh.dlq_url) == (4, 0)
    assert await depth(aws, fresh.queue_url) == (0, 0)
    [line] = [a for a in audit_lines(caplog) if a["what"] == "discard"]
    assert (line["who"], line["count"]) == ("operator", 2)


async def sealed_dead_letter(aws: AwsClients, settings: Settings) -> tuple[str, str]:
    """A real create-mailbox event for PERSON, sealed and dead-lettered; (message id, request id)."""
    request_id = uuid.uuid4().hex
    cipher = EnvelopeCipher(aws.kms, settings.envelope)
    try:
        event = create_mailbox.event(PERSON, "idm-1", "tester", now_iso())
        body = await cipher.seal(create_mailbox.NAME, request_id, event)
    finally:
        await cipher.aclose()
    attributes = {
        "op": create_mailbox.NAME,
        "request_id": request_id,
        "dlq": dead_letter("target_rejected", "crm"),
    }
    return await plant(aws, settings.queue.dlq_url, body, attributes), request_id


async def test_a_message_page_masks_personal_fields(
    admin: Console, aws: AwsClients, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="courier.console")
    message_id, request_id = await sealed_dead_letter(aws, admin.settings)
    record = StatusRecord(
        request_id,
        create_mailbox.NAME,
        RequestState.FAILED,
        now_iso(),
        now_iso(),
        targets={"crm": "failed", "billing": "delivered"},
    )
    await admin.app[STATUS].create(record)
    page = await admin.page(f"/dead-letters/messages/{message_id}")
    masked = re.search(r'<pre id="masked-event">(.*?)</pre>', page, re.S)
    assert masked, page[:800]
    assert "standard" in masked.group(1)  # not personal: shown
    for personal in ("Jane Doe", "jane.doe@example.com", "jane.doe", "+447700900123"):
        assert personal not in page, personal
    assert "target_rejected" in page
    assert request_id in page
    assert 'data-target="billing"' in page
    assert "delivered" in page
    assert audit_lines(caplog) == [a for a in audit_lines(caplog) if a["what"] == "login"]

    # Unmasking needs its own scope: an admin token without it is refused, and that is logged.
    status, refused = await admin.submit(
        f"/dead-letters/messages/{message_id}", f"/dead-letters/messages/{message_id}/unmask"
    )
    assert status == 403
    assert "Jane Doe" not in refused
    status, _, _ = await admin.log_in(token(ADMIN, UNMASK, subject="auditor"))
    assert status == 303
    status, shown = await admin.submit(
        f"/dead-letters/messages/{message_id}", f"/dead-letters/messages/{message_id}/unmask"
    )
    assert status == 200
    assert "Jane Doe" in shown
    assert "jane.doe@example.com" in shown
    unmasks = [a for a in audit_lines(caplog) if a["what"] == "unmask"]
    assert [(a["who"], a["count"], a["request_id"]) for a in unmasks] == [
        ("operator", 0, request_id),
        ("auditor", 1, request_id),
    ]
    assert unmasks[1]["filter"] == {"message_ids": [message_id]}


async def test_requests_page_shows_the_record_and_its_timeline(admin: Console) -> None:
    request_id = uuid.uuid4().hex
    record = StatusRecord(
        request_id,
        create_mailbox.NAME,
        RequestState.PROCESSING,
        "2026-01-01T00:00:00.000Z",
        "2026-01-01T00:00:05.000Z",
        targets={"crm": "delivered", "billing": "pending"},
    )
    await admin.app[STATUS].create(record)
    page = await admin.page(f"/requests?id={request_id}")
    assert '<td id="request-state">processing</td>' in page
    assert 'data-target="billing" data-state="pending"' in page
    timeline = re.search(r'<ol id="timeline">(.*?)</ol>', page, re.S)
    assert timeline
    assert timeline.group(1).index("accepted") < timeline.group(1).index("last update")
    assert "no such request" in await admin.page(f"/requests?id={uuid.uuid4().hex}")


async def test_the_secrets_page_never_shows_a_value(admin: Console) -> None:
    page = await admin.page("/secrets")
    assert 'data-name="courier.jwt.hs256"' in page
    assert 'data-name="courier.idm.api_key"' in page
    # The store's latest version of each (bootstrap stored version 1).
    assert re.search(
        r'data-name="courier.jwt.hs256">\s*<td><code>[^<]+</code></td>\s*<td>1</td>', page
    )
    for value in DEMO_SECRETS.values():
        assert value not in page
        assert value[:12] not in page


async def test_the_chart_follows_the_process_counters(admin: Console) -> None:
    from service import metrics

    async def points() -> int:
        async with admin.http.get(f"{admin.url}/overview.json") as response:
            assert response.status == 200
            document = await response.json()
        assert set(document["series"]) == {"t", "completed", "retried", "dead_lettered"}
        return int(document["points"])

    before = await points()
    for _ in range(40):
        metrics.messages_processed.labels("completed").inc()
        await __import__("asyncio").sleep(0.1)
    assert await points() > before


async def test_no_console_no_sampler(settings: Settings) -> None:
    """Off by default: no port, no task, nothing sampled."""
    import asyncio

    configured = console_settings(settings, console=ConsoleSettings())
    async with daemon.serving(configured) as listening:
        assert listening.console_url is None
        names = {task.get_name() for task in asyncio.all_tasks()}
        assert "console-sampler" not in names


async def test_a_request_for_a_file_keeps_the_sign_in_nonce(console: Console) -> None:
    """A browser asks for /favicon.ico while the login page is open: the page's nonce stays."""
    async with console.http.get(f"{console.url}/") as page:
        nonce = csrf_of(await page.text())
    for path in ("/favicon.ico", "/robots.txt"):
        async with console.http.get(f"{console.url}{path}") as response:
            assert response.status in (204, 401)
            assert "courier_console_login" not in "".join(response.headers.getall("Set-Cookie", []))
    async with console.http.post(
        f"{console.url}/login",
        data={"token": token(ADMIN), "csrf": nonce, "next": "/"},
        allow_redirects=False,
    ) as response:
        assert response.status == 303


async def test_every_page_renders_with_nothing_to_show(admin: Console) -> None:
    """Empty DLQ, no request asked for, no worker: each page still answers with its form."""
    for path, marker in (
        ("/", 'id="throughput-chart"'),
        ("/targets", 'id="targets"'),
        ("/dead-letters", 'id="dlq-groups"'),
        ("/dead-letters/messages", 'id="replay-form"'),
        ("/requests", 'id="request-id"'),
        ("/secrets", 'id="secrets"'),
    ):
        assert marker in await admin.page(path), path
    await admin.page("/dead-letters/messages/no-such-message", status=404)
    await admin.page("/actions/no-such-job", status=404)


async def test_targets_page_shows_each_target_and_its_circuit(
    settings: Settings, aws: AwsClients
) -> None:
    from service.state import TARGETS
    from tests.chain import chain_settings, serving_stubs

    async with serving_stubs() as stubs:
        urls = {name: stub.url for name, stub in stubs.items()}
        configured = chain_settings(settings, "http://127.0.0.1:9", urls)
        async with running_console(configured, role="worker") as console:
            assert (await console.log_in(token(ADMIN)))[0] == 303
            crm = next(t for t in console.app[TARGETS] if t.name == "crm")
            for _ in range(crm.settings.breaker_failures):
                crm.breaker.record_failure()
            page = await console.page("/targets")
    rows = dict(
        re.findall(r'<tr class="target" data-target="([^"]+)" data-circuit="([^"]+)"', page)
    )
    assert rows == {"crm": "open", "billing": "closed", "directory": "closed"}
    # Concurrency in use / limit, from each target's limiter.
    assert len(re.findall(r'<td class="concurrency">\d+ / \d+', page)) == 3
    # An open circuit holds delivery back: the target is flagged constrained.
    crm_row = page.split('data-target="crm"')[1].split("</tr>")[0]
    assert "constrained" in crm_row


def test_a_redriven_group_is_selected_by_id_never_as_everything() -> None:
    """Messages SQS's redrive moved carry no reason to filter on: the console picks them by id."""
    from service.console.deadletters import REDRIVE, DeadLetterView, Snapshot, selection
    from service.worker.outcomes import Message

    def received(message_id: str, attributes: dict[str, str]) -> DeadLetterView:
        return DeadLetterView.of(Message(message_id, "handle", "body", attributes, 4, 1.0))

    redriven = received("m-1", {"op": "create-mailbox"})
    rejected = received("m-2", {"op": "create-mailbox", "dlq": dead_letter("target_rejected")})
    snapshot = Snapshot((redriven, rejected), 2.0, complete=True)
    assert redriven.reason == REDRIVE
    chosen = selection(REDRIVE, "", "create-mailbox", [], snapshot)
    assert chosen.message_ids == {"m-1"}
    assert chosen.reason == ""
    nothing = selection(REDRIVE, "", "", [], None)
    assert nothing.message_ids == {"(none)"}


@pytest.mark.parametrize(
    "elsewhere",
    [
        "//evil.example/",
        "/\\evil.example/",
        "https://evil.example/",
        "/\t/evil.example/",
        "/\n/evil.example/",
        "//evil",
        "/\\evil",
        "https://evil",
        "/ /evil.example/",
        "evil.example",
    ],
)
async def test_signing_in_never_redirects_off_the_console(console: Console, elsewhere: str) -> None:
    async with console.http.get(f"{console.url}/login") as page:
        nonce = csrf_of(await page.text())
    async with console.http.post(
        f"{console.url}/login",
        data={"token": token(ADMIN), "csrf": nonce, "next": elsewhere},
        allow_redirects=False,
    ) as response:
        assert (response.status, response.headers["Location"]) == (303, "/")


# --- actions never hold the pages; discards delete what was shown ------------------------------


async def dlq_held(aws: AwsClients, dlq_url: str) -> None:
    """Until a pass holds DLQ messages (no page reads meanwhile: it is the action's pass)."""
    import asyncio

    for _ in range(100):
        _visible, in_flight = await depth(aws, dlq_url)
        if in_flight:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("no pass took the DLQ's messages")


async def test_pages_answer_at_once_while_a_slow_replay_runs(
    settings: Settings, aws: AwsClients, fresh: Resources, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    caplog.set_level(logging.INFO, logger="courier.console")
    await plant_dead_letters(aws, fresh.dlq_url)
    async with running_console(settings) as console:
        assert (await console.log_in(token(ADMIN)))[0] == 303
        # 0.1/s: one move at once, the next 10 s later; nothing has read the DLQ yet.
        posting = asyncio.create_task(
            console.submit("/", "/dead-letters/replay", reason="undecryptable", rate="0.1")
        )
        try:
            await dlq_held(aws, fresh.dlq_url)
            busy = await asyncio.wait_for(console.page("/dead-letters", status=503), 5)
            assert 'id="dlq-busy"' in busy
            assert "examined so far" in busy
            job = re.search(r'href="(/actions/[^"]+)"', busy)
            assert job, busy[:800]
            for _ in range(50):  # its page follows it: one moved, the next waits for the rate
                running = action_result(await asyncio.wait_for(console.page(job.group(1)), 5))
                if (running["chosen"], running["moved"]) == ("2", "1"):
                    break
                await asyncio.sleep(0.1)
            assert (running["state"], running["chosen"], running["moved"]) == ("running", "2", "1")
            await asyncio.wait_for(console.page("/dead-letters/messages", status=503), 5)
            lookup = f"/requests?id={uuid.uuid4().hex}"
            unknown = await asyncio.wait_for(console.page(lookup), 5)
            assert "no such request (or its record expired)" in unknown
            assert "The DLQ was not checked: an action holds it" in unknown
        finally:
            posting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await posting
    # Shutting down cancelled the job: its end line has the real counts.
    lines = audit_lines(caplog)
    [started] = [a for a in lines if a["what"] == "replay_started"]
    [ended] = [a for a in lines if a["what"] == "replay"]
    assert started["job"] == ended["job"]
    assert (ended["outcome"], ended["count"], ended["matched"]) == ("cancelled", 1, 2)
    visible, in_flight = await depth(aws, fresh.dlq_url)
    assert visible + in_flight == 5


async def test_stop_ends_a_slow_replay_and_releases_what_it_held(
    admin: Console, aws: AwsClients, fresh: Resources, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    caplog.set_level(logging.INFO, logger="courier.console")
    await plant_dead_letters(aws, fresh.dlq_url)
    # 0.1/s: one move at once, the next 10 s later (a replay that would outlast the shift).
    posting = asyncio.create_task(
        admin.submit("/", "/dead-letters/replay", reason="undecryptable", rate="0.1")
    )
    try:
        await dlq_held(aws, fresh.dlq_url)
        busy = await admin.page("/dead-letters", status=503)
        found = re.search(r'href="(/actions/[^"]+)"', busy)
        assert found, busy[:800]
        job = found.group(1)
        for _ in range(50):
            running = await admin.page(job)
            if action_result(running)["moved"] == "1":
                break
            await asyncio.sleep(0.1)
        assert 'id="stop-form"' in running
        async with admin.http.post(f"{admin.url}{job}/stop") as response:
            assert response.status == 403  # no CSRF token: still running
        assert action_result(await admin.page(job))["state"] == "running"
        status, stopped = await asyncio.wait_for(admin.submit(job, f"{job}/stop"), 10)
        again, _ = await asyncio.wait_for(admin.submit(job, f"{job}/stop"), 10)
        assert again == 200  # stopping an ended job changes nothing
    finally:
        posting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await posting
    assert status == 200
    result = action_result(stopped)
    # The second undecryptable one was chosen (waiting for its turn) or not reached yet.
    assert (result["state"], result["moved"], result["chosen"] in ("1", "2")) == (
        "cancelled",
        "1",
        True,
    )
    assert "Stopped by operator" in stopped
    assert 'id="stop-form"' not in stopped
    [ended] = [a for a in audit_lines(caplog) if a["what"] == "replay"]
    assert (ended["outcome"], ended["count"], ended["stopped_by"]) == ("cancelled", 1, "operator")
    # The other undecryptable one and the rest are visible again at once, not 60 s later.
    assert await depth(aws, fresh.dlq_url) == (5, 0)
    assert len(await receive_all(aws, fresh.queue_url)) == 1


async def test_a_move_stuck_in_sqs_holds_the_stop_for_seconds_and_loses_nothing(
    settings: Settings, aws: AwsClients, fresh: Resources, caplog: pytest.LogCaptureFixture
) -> None:
    """SQS hangs while a console replay moves a message: the daemon still stops within the
    console's bound (its jobs wait CLOSE_SECONDS while the worker and API drain), says which
    action it left, and every planted message is still in the DLQ or on the work queue."""
    import asyncio
    import time

    caplog.set_level(logging.INFO, logger="courier.console")
    await plant_dead_letters(aws, fresh.dlq_url)
    stuck_seconds = 8.0  # longer than the whole bounded stop; the proxy's cleanup waits it out
    proxy = Proxy({"sqs": str(settings.aws.endpoint_for("sqs"))}, lenient=True)
    async with listening(proxy) as urls:
        through = dataclasses.replace(settings.aws, sqs_endpoint_url=urls["sqs"])
        async with contextlib.AsyncExitStack() as stack:
            console = await stack.enter_async_context(
                running_console(settings.replace(aws=through))
            )
            assert (await console.log_in(token(ADMIN)))[0] == 303
            posting = asyncio.create_task(  # 1/s: the second move starts a second after the first
                console.submit("/", "/dead-letters/replay", reason="target_rejected", rate="1")
            )
            stack.push_async_callback(_cancelled, posting)
            await dlq_held(aws, fresh.dlq_url)
            busy = await console.page("/dead-letters", status=503)
            found = re.search(r'href="(/actions/[^"]+)"', busy)
            assert found, busy[:800]
            for _ in range(50):
                if action_result(await console.page(found.group(1)))["moved"] == "1":
                    break
                await asyncio.sleep(0.1)
            proxy.behaviour["sqs"].latency_seconds = stuck_seconds
            sends = proxy.counts["sqs"]["SendMessage"]
            for _ in range(50):  # the next move's send arrives, and is held at the proxy
                if proxy.counts["sqs"]["SendMessage"] > sends:
                    break
                await asyncio.sleep(0.1)
            assert proxy.counts["sqs"]["SendMessage"] > sends, dict(proxy.counts["sqs"])
            stopping = time.monotonic()
            exiting = asyncio.create_task(stack.aclose())
            # The API's drain does not wait for the console: its port closes after the close
            # grace (0.1 s here), while the console still waits for its job.
            api = URL(console.api_url)
            refused_after = await _refused_within(api.host or "", api.port or 0, CLOSE_SECONDS)
            assert refused_after is not None, "the API kept listening while the console closed"
            await exiting
        stopped_in = time.monotonic() - stopping
    assert stopped_in < CLOSE_SECONDS + 3, f"the stop took {stopped_in:.1f} s"
    [left] = [
        fields
        for record in caplog.records
        if (fields := getattr(record, "fields", {})).get("event") == "console_action_unfinished"
    ]
    assert left["jobs"]
    assert left["waited_seconds"] == CLOSE_SECONDS
    # The held send reached SQS after the stop or never did; the original stays in the DLQ
    # either way (at worst replayed twice): nothing planted is lost.
    dlq = sum(await depth(aws, fresh.dlq_url))
    work = sum(await depth(aws, fresh.queue_url))
    assert dlq == sum(PLANTED.values()) - 1, (dlq, work)
    assert work in (1, 2), (dlq, work)


async def _refused_within(host: str, port: int, seconds: float) -> float | None:
    """Seconds until ``host:port`` refuses a connection, or None if it never did by then."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while loop.time() - started < seconds:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            return loop.time() - started
        writer.close()
        await asyncio.sleep(0.05)
    return None


async def _cancelled(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_too_slow_a_rate_or_too_many_actions_are_refused(
    admin: Console, aws: AwsClients, fresh: Resources
) -> None:
    import asyncio

    await plant_dead_letters(aws, fresh.dlq_url)
    status, page = await asyncio.wait_for(
        admin.submit("/", "/dead-letters/replay", reason="undecryptable", rate="0.000001"), 10
    )
    assert (status, action_result(page)["state"]) == (400, "refused")
    assert "0.1" in page
    assert await depth(aws, fresh.dlq_url) == (6, 0)

    slow = {"reason": "target_rejected", "rate": "0.1"}
    first = asyncio.create_task(admin.submit("/", "/dead-letters/replay", **slow))
    try:
        await dlq_held(aws, fresh.dlq_url)
        status, page = await asyncio.wait_for(
            admin.submit("/", "/dead-letters/replay", **slow, dry_run="1"), 10
        )
        assert action_result(page)["state"] == "running"  # queued behind the first
        status, page = await asyncio.wait_for(admin.submit("/", "/dead-letters/replay", **slow), 10)
        assert (status, action_result(page)["state"]) == (429, "refused")
    finally:
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first


async def test_discard_deletes_exactly_the_listed_messages(
    admin: Console, aws: AwsClients, fresh: Resources
) -> None:
    await plant_dead_letters(aws, fresh.dlq_url)
    group = "/dead-letters/messages?reason=undecryptable"
    listing = await admin.page(group)
    form = re.search(r'<form[^>]*id="discard-form".*?</form>', listing, re.S)
    assert form
    shown = re.findall(r'type="hidden" name="id" value="([^"]+)"', form.group(0))
    assert len(shown) == 2
    # One more of the group arrives after the page was read: it was not shown, it stays.
    later = uuid.uuid4().hex
    dlq = dead_letter("undecryptable")
    await plant(
        aws, fresh.dlq_url, "sealed", {"op": "create-mailbox", "request_id": later, "dlq": dlq}
    )
    fields = {"reason": "undecryptable", "expected": "2", "confirm": "discard 2"}
    status, page = await admin.submit(group, "/dead-letters/discard", **fields)
    assert (status, action_result(page)["state"]) == (409, "refused")  # no ids
    status, page = await admin.submit(group, "/dead-letters/discard", **fields, id=shown[:1])
    assert (status, action_result(page)["state"]) == (409, "refused")  # 1 id, "discard 2"
    assert await depth(aws, fresh.dlq_url) == (7, 0)

    status, page = await admin.submit(group, "/dead-letters/discard", **fields, id=shown)
    assert (status, action_result(page)["moved"]) == (200, "2")
    left = await receive_all(aws, fresh.dlq_url)
    assert len(left) == 5
    assert later in {m["MessageAttributes"]["request_id"]["StringValue"] for m in left}


async def test_the_last_read_is_served_marked_stale_while_an_action_runs(
    admin: Console, aws: AwsClients, fresh: Resources
) -> None:
    import asyncio

    await plant_dead_letters(aws, fresh.dlq_url)
    listing = await admin.page("/dead-letters/messages?reason=unknown_op")
    [one] = re.findall(r'data-message-id="([^"]+)"', listing)
    status, page = await admin.submit(
        f"/dead-letters/messages/{one}",
        "/dead-letters/discard",
        expected="1",
        confirm="discard 1",
        id=[one],
    )
    assert (status, action_result(page)["moved"]) == (200, "1")
    posting = asyncio.create_task(
        admin.submit("/", "/dead-letters/replay", reason="undecryptable", rate="0.1")
    )
    try:
        await dlq_held(aws, fresh.dlq_url)
        page = await asyncio.wait_for(admin.page("/dead-letters"), 5)
        assert 'id="dlq-stale"' in page
        assert "examined so far" in page
        assert 'data-reason="unknown_op"' in page  # the read from before the discard
        lookup = await asyncio.wait_for(admin.page(f"/requests?id={uuid.uuid4().hex}"), 5)
        assert "before the action now running" in lookup
    finally:
        posting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await posting


# --- overview queues, an unopenable envelope, a failing secrets read ----------------------------


def queue_cells(page: str, queue_url: str) -> list[str]:
    """The text of each cell of the overview's row for ``queue_url``."""
    name = queue_url.rsplit("/", 1)[-1]
    row = re.search(rf'<tr class="queue" data-queue="{re.escape(name)}">(.*?)</tr>', page, re.S)
    assert row, page[:800]
    return [
        re.sub(r"<[^>]+>", "", cell).strip()
        for cell in re.findall(r"<td[^>]*>(.*?)</td>", row.group(1), re.S)
    ]


async def test_the_overview_shows_each_queue_its_depth_and_oldest_age(
    settings: Settings, aws: AwsClients, fresh: Resources
) -> None:
    """Depths from SQS; moto's CloudWatch has no SQS data, so the DLQ's age comes from the
    console's last read of it; a queue that does not exist shows its error in its row."""
    missing = fresh.queue_url.rsplit("/", 1)[0] + f"/no-such-queue-{uuid.uuid4().hex[:8]}"
    changes = {"console": ConsoleSettings(enabled=True, port=0, extra_queues=(missing,))}
    import time

    for index in range(2):
        await plant(aws, fresh.queue_url, f"waiting-{index}")
    # Two letters, the older failed two hours (and 30 s) ago.
    for ago in (7230.0, 60.0):
        failed = dead_letter("target_rejected", "crm", time.time() - ago)
        await plant(aws, fresh.dlq_url, "sealed", {"op": "create-mailbox", "dlq": failed})
    async with running_console(settings, **changes) as console:
        assert (await console.log_in(token(ADMIN)))[0] == 303
        await console.page("/dead-letters")  # the read the DLQ's age falls back on
        page = await console.page("/")
    work = queue_cells(page, fresh.queue_url)
    assert work[0] == "work queue"
    assert work[2:] == ["2", "0", "0", "—"]  # visible, in flight, delayed; no age known
    dead = queue_cells(page, fresh.dlq_url)
    assert dead[0] == "dead-letter queue"
    assert dead[-1] == "2h 00m", dead  # the oldest letter's, from the console's read
    extra = queue_cells(page, missing)
    assert extra[0] == "extra queue"
    assert "NonExistentQueue" in extra[2] or "does not exist" in extra[2], extra
    assert extra[3:] == ["—"]


async def test_a_message_whose_envelope_cannot_be_opened_says_so(
    admin: Console, aws: AwsClients, fresh: Resources
) -> None:
    request_id = uuid.uuid4().hex
    attributes = {"op": create_mailbox.NAME, "request_id": request_id}
    attributes["dlq"] = dead_letter("undecryptable", "")
    message_id = await plant(aws, fresh.dlq_url, "not-an-envelope", attributes)
    page = await admin.page(f"/dead-letters/messages/{message_id}")
    error = re.search(r'<p[^>]*id="event-error"[^>]*>(.*?)</p>', page, re.S)
    assert error, page[:800]
    assert "the envelope cannot be opened" in error.group(1)
    assert 'id="masked-event"' not in page
    assert request_id in page  # the rest of the page is still there


async def test_the_secrets_page_shows_a_version_it_cannot_read(
    settings: Settings, aws: AwsClients
) -> None:
    """The store fails after the secrets were cached: each row says its version is unreadable."""
    from service.bootstrap import ResourceNames, bootstrap

    prefix = f"sec-{uuid.uuid4().hex[:8]}"
    names = ResourceNames(prefix=prefix, secrets_table=f"{prefix}-credential-store")
    configured = (await bootstrap(aws, names, DEMO_SECRETS)).apply_to(settings)
    async with running_console(configured) as console:
        assert (await console.log_in(token(ADMIN)))[0] == 303
        row = r'data-name="courier.jwt.hs256">\s*<td><code>[^<]+</code></td>\s*<td>{}</td>'
        assert re.search(row.format("1"), await console.page("/secrets"))
        await aws.dynamodb.delete_table(TableName=names.secrets_table)
        page = await console.page("/secrets")
    assert re.search(row.format(r"unreadable: \w+"), page), page[:1500]
    for value in DEMO_SECRETS.values():
        assert value not in page
