"""The operator console as a person uses it: a real chromium (Debian's, headless, through
chromium-driver; ``courier_testkit.browser``) against ``courier local``.

One ``courier local`` (embedded moto, stub IdM and legacy systems, the daemon with its console on
a port of its own) and one browser serve the whole module; the tests run in file order and build
on each other the way an operator's session does: log in, find the dead letters grouped by
reason, open one, replay one group once its target is fixed, discard another, and watch the
chart move under load. The screenshots land in build/console-screenshots/.

Poison of three kinds is planted: three requests through the API while ``directory`` refuses
them (400 -> ``target_rejected``), two envelopes whose data key was tampered with
(``undecryptable``) and two sealed for an operation courier does not have (``unknown_op``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web
from selenium.webdriver.common.by import By

from courier_testkit.browser import DOCS_IMAGES, Browser, chromium, missing, publish
from courier_testkit.ports import free_port, serving
from courier_testkit.processes import ManagedProcess, python_env
from service.aws import AwsClients, open_clients
from service.console.auth import ADMIN_SCOPE
from service.envelope import EnvelopeCipher
from service.local import use_fake_credentials
from service.operations import create_mailbox
from service.secrets.credstash import CredStash
from service.settings import Settings, load_settings
from service.status import now_iso
from service.worker.dlq import DeadLetterInfo
from tests.chain import eventually, plant

pytestmark = [
    pytest.mark.skipif(bool(missing()), reason=missing() or ""),
    # About 40 s for the module on 2 busy cores; the bound is for a machine under load.
    pytest.mark.timeout(150),
]

REFUSING = "directory"  # the legacy stub that refuses, then is fixed
BANNER = "courier local is running"
SAMPLE_SECONDS = 1  # how often the console samples its counters (its minimum)
WAIT = 20.0  # generous: courier, moto and chromium share 2 cores with whatever else runs
POLL = 0.2  # seconds between checks: a check may drive the browser
POISON = {"target_rejected": 3, "undecryptable": 2, "unknown_op": 2}
AFTER_REPLAY = {"undecryptable": 2, "unknown_op": 2}
AFTER_DISCARD = {"undecryptable": 2}
UNKNOWN_OP = "delete-everything"


@dataclass
class Console:
    """``courier local`` with its console, the browser, the tokens, and the requests refused."""

    api: str
    console_url: str
    settings: Settings
    aws: AwsClients
    http: aiohttp.ClientSession
    browser: Browser
    admin_token: str  # mailbox:admin: the console's
    create_token: str  # courier token's default scopes (create, read): the API's, not the console's
    process: ManagedProcess
    rejected: list[str]  # request ids the refusing target dead-lettered

    def stub_url(self, target: str) -> str:
        """The base URL of a legacy stub (its control routes live there)."""
        (found,) = (t.url for t in self.settings.targets if t.name == target)
        parts = urlsplit(found)
        return f"{parts.scheme}://{parts.netloc}"

    async def stub_behaviour(self, target: str, **changes: Any) -> None:
        """Change a stub's behaviour over HTTP, as an operator's fix would change the system."""
        url = f"{self.stub_url(target)}/_stub/behaviour"
        async with self.http.post(url, json=changes) as response:
            assert response.status == 200, await response.text()

    async def create(self, index: int) -> str:
        """POST a create-mailbox request through the API; its request id."""
        headers = {"Authorization": f"Bearer {self.create_token}"}
        async with self.http.post(
            f"{self.api}/v1/mailboxes", json=person(index), headers=headers
        ) as response:
            document = await response.json()
            assert response.status == 202, document
            return str(document["request_id"])

    async def status(self, request_id: str) -> str:
        """The request's status as the API reports it."""
        headers = {"Authorization": f"Bearer {self.create_token}"}
        async with self.http.get(
            f"{self.api}/v1/requests/{request_id}", headers=headers
        ) as response:
            assert response.status == 200, await response.text()
            return str((await response.json())["status"])

    async def dlq_reasons(self) -> dict[str, int]:
        """reason -> count of the DLQ's messages, as SQS reports them (not the console). The
        receives leave every message visible: this module's few never fill one receive."""
        found: dict[str, dict[str, Any]] = {}
        for _ in range(3):
            response = await self.aws.sqs.receive_message(
                QueueUrl=self.settings.queue.dlq_url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=0,
                VisibilityTimeout=0,
                MessageAttributeNames=["All"],
            )
            for raw in response.get("Messages", []):
                found[raw["MessageId"]] = raw
        counts: dict[str, int] = {}
        for raw in found.values():
            info = DeadLetterInfo.of_sqs(raw)
            reason = info.reason if info else "(none)"
            counts[reason] = counts.get(reason, 0) + 1
        return counts


def person(index: int) -> dict[str, str]:
    """A mailbox for a person whose name and address must never show unmasked."""
    return {
        "username": f"jane.doe{index}",
        "display_name": f"Jane Doe {index}",
        "plan": "standard",
        "contact_email": f"jane.doe{index}@example.com",
    }


# --- courier local, its tokens, the poison ------------------------------------------------------


@contextlib.asynccontextmanager
async def courier_local(directory: Path) -> AsyncIterator[tuple[ManagedProcess, str, str]]:
    """``courier local`` with the console on, run in ``directory`` (it writes
    ``.courier/local.toml`` there); yields the process, the API's URL and the console's."""
    api_port, console_port = free_port(), free_port()
    env = python_env(
        {
            "COURIER_CONSOLE_ENABLED": "true",
            "COURIER_CONSOLE_PORT": str(console_port),
            "COURIER_CONSOLE_SAMPLE_SECONDS": str(SAMPLE_SECONDS),
            "PYTHONUNBUFFERED": "1",
        }
    )
    argv = [sys.executable, "-m", "service", "local", "--port", str(api_port), "--aws-port", "0"]
    process = ManagedProcess(
        argv, name="courier-local", env=env, cwd=directory, directory=directory
    )
    try:
        await process.wait_for_output(BANNER, 60, stream="stderr")
        yield process, f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{console_port}"
    finally:
        await process.stop(10)


async def courier_token(config: Path, *scopes: str, subject: str = "operator") -> str:
    """What ``courier --config .courier/local.toml token --scope ...`` prints (the README's way
    to log in to the console); no scope: the command's default ones."""
    args = [arg for scope in scopes for arg in ("--scope", scope)]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "--config",
        str(config),
        "token",
        "--subject",
        subject,
        *args,
        env=python_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return out.decode().strip()


async def plant_poison(aws: AwsClients, settings: Settings) -> None:
    """Envelopes no worker can ever deliver, put straight on the work queue: ``undecryptable``
    (the data key tampered with) and ``unknown_op`` (sealed for an operation courier lacks)."""
    cipher = EnvelopeCipher(aws.kms, settings.envelope)
    try:
        for index in range(POISON["undecryptable"]):
            request_id = uuid.uuid4().hex
            event = create_mailbox.event(person(100 + index), "idm-x", "tester", now_iso())
            document = json.loads(await cipher.seal(create_mailbox.NAME, request_id, event))
            document["key"]["ek"] = base64.b64encode(os.urandom(184)).decode()
            attributes = {"op": create_mailbox.NAME, "request_id": request_id}
            await plant(aws, settings.queue.url, json.dumps(document), attributes)
        for _ in range(POISON["unknown_op"]):
            request_id = uuid.uuid4().hex
            body = await cipher.seal(UNKNOWN_OP, request_id, {"everything": True})
            attributes = {"op": UNKNOWN_OP, "request_id": request_id}
            await plant(aws, settings.queue.url, body, attributes)
    finally:
        await cipher.aclose()


@pytest.fixture(scope="module")
async def console(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Console]:
    """``courier local`` with its console, a chromium not signed in, and the tokens."""
    directory = tmp_path_factory.mktemp("console")
    use_fake_credentials()
    async with contextlib.AsyncExitStack() as stack:
        # The browser starts while courier does; it is on the stack (quit on exit) even when
        # courier fails to start.
        browser_started = asyncio.create_task(stack.enter_async_context(chromium()))
        try:
            process, api, console_url = await stack.enter_async_context(courier_local(directory))
        finally:
            browser = await browser_started
        config = directory / ".courier" / "local.toml"
        settings = load_settings(config, environ={})
        admin, create = await asyncio.gather(
            courier_token(config, ADMIN_SCOPE), courier_token(config)
        )
        aws = await stack.enter_async_context(open_clients(settings.aws))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        yield Console(api, console_url, settings, aws, http, browser, admin, create, process, [])


# --- what a person sees ------------------------------------------------------------------------


async def log_in(browser: Browser, console_url: str, token: str) -> None:
    """Open the console, paste ``token`` into the sign-in form and press the button."""
    await browser.get(console_url + "/")
    await browser.type("#token", token)
    await browser.follow("#login")


async def sees_login_page(browser: Browser) -> None:
    """The sign-in form is shown, and none of the console's pages."""
    await browser.wait_for("#token")
    await browser.wait_for("#login")
    assert not await browser.find("#nav-overview"), "console navigation shown without a login"
    assert not await browser.find("#throughput-chart")


async def page_source(browser: Browser) -> str:
    """The page's HTML as the browser has it now."""
    return await asyncio.to_thread(lambda: str(browser.driver.page_source))


async def group_rows(browser: Browser) -> dict[str, dict[str, str]]:
    """The dead-letter groups on the page: reason -> its row's target, op and count."""

    def read() -> dict[str, dict[str, str]]:
        rows = browser.driver.find_elements(By.CSS_SELECTOR, "#dlq-groups tr.dlq-group")
        return {
            str(row.get_attribute("data-reason")): {
                name: row.get_attribute(f"data-{name}") or "" for name in ("target", "op", "count")
            }
            for row in rows
        }

    return await asyncio.to_thread(read)


async def dead_letter_groups(browser: Browser, wanted: Mapping[str, int]) -> dict[str, Any]:
    """The Dead letters page, opened from the navigation until its groups show ``wanted``
    (reason -> count): the console reads the DLQ at most every 10 s."""

    async def shown() -> dict[str, Any] | None:
        await browser.follow("#nav-dead-letters")
        await browser.wait_for("#dlq-groups")
        rows = await group_rows(browser)
        counts = {reason: int(row["count"] or 0) for reason, row in rows.items()}
        return rows if counts == dict(wanted) else None

    found: dict[str, Any] = await eventually(
        shown, WAIT, f"dead-letter groups {dict(wanted)}", interval=POLL
    )
    return found


async def open_group(browser: Browser, reason: str) -> list[str]:
    """From the Dead letters page, the messages of a group (its link); their message ids."""
    await browser.follow(f'#dlq-groups tr.dlq-group[data-reason="{reason}"] a.group-link')
    await browser.wait_for("#replay-form")
    rows = await browser.find("tr.dlq-message")
    return [
        await asyncio.to_thread(lambda row=row: row.get_attribute("data-message-id") or "")
        for row in rows
    ]


async def set_checkbox(browser: Browser, css: str, ticked: bool) -> None:
    """Tick or untick a checkbox by clicking it, as a person would."""
    element = await browser.wait_for(css)
    if await asyncio.to_thread(element.is_selected) != ticked:
        await browser.click(css)


async def action_outcome(browser: Browser) -> dict[str, str]:
    """The action's result page once the action has finished (it refreshes itself while the
    action runs): ``#action-result``'s data attributes and its text."""

    def finished() -> dict[str, str] | None:
        found = browser.driver.find_elements(By.ID, "action-result")
        if not found or found[0].get_attribute("data-state") == "running":
            return None
        element = found[0]
        names = ("state", "kind", "dry-run", "matched", "chosen", "moved", "failed")
        outcome = {name: element.get_attribute(f"data-{name}") or "" for name in names}
        return {**outcome, "text": str(element.text)}

    return await browser.wait_until(finished, WAIT, "the action to finish")


def for_the_readme(screenshot: Path, name: str) -> None:
    """Copy a screenshot to docs/images/ for the README when it has none yet, or when
    ``COURIER_DOCS_IMAGES=1`` asks for fresh ones: every ``make test`` rewriting tracked images
    would leave every checkout modified."""
    if os.environ.get("COURIER_DOCS_IMAGES") == "1" or not (DOCS_IMAGES / name).exists():
        publish(screenshot, name)


# --- the tests, in the order an operator's session goes ----------------------------------------


async def test_the_browser_drives_a_page_served_by_this_event_loop(tmp_path: Path) -> None:
    """The kit's browser itself, before any console: a page this loop serves (so a WebDriver
    call that blocked the loop would hang here), a form typed into and sent, a screenshot of
    the whole page, taller than the window, and the browser's log catching what a
    Content-Security-Policy refused (so the last test here, which reads it, can fail)."""
    seen: list[str] = []

    async def page(request: web.Request) -> web.Response:
        if request.method == "POST":
            seen.append(str((await request.post())["name"]))
        body = "<form method=post><input id=name name=name><button id=send>Send</button></form>"
        tall = '<div id="tall" style="height: 2000px">sent: ' + ", ".join(seen) + "</div>"
        inline = "<script>document.title = 'ran';</script>"  # what the policy refuses
        return web.Response(
            text=f"<html><body>{body}{tall}{inline}</body></html>",
            content_type="text/html",
            headers={"Content-Security-Policy": "script-src 'self'"},
        )

    app = web.Application()
    app.router.add_route("*", "/", page)
    async with serving(app) as url, chromium(screenshots=tmp_path) as browser:
        await browser.get(url + "/")
        await browser.type("#name", "courier")
        await browser.follow("#send")
        await browser.wait_until(
            lambda: "sent: courier" in browser.driver.find_element("id", "tall").text, WAIT
        )
        shot = await browser.screenshot("smoke")
        log = await browser.log()
        title = await asyncio.to_thread(lambda: browser.driver.title)
    assert seen == ["courier"]
    assert title != "ran"
    assert any("Content Security Policy" in line for line in log), log
    assert shot.read_bytes().startswith(b"\x89PNG")
    height = int.from_bytes(shot.read_bytes()[20:24], "big")  # the PNG's IHDR
    assert height > 2000, f"the screenshot is {height} px tall: the window only"


async def test_a_missing_or_wrong_token_sees_the_login_page(console: Console) -> None:
    browser = console.browser
    await browser.clear_cookies()
    for page in ("/", "/dead-letters", "/requests"):  # no cookie at all
        await browser.get(console.console_url + page)
        await sees_login_page(browser)
    await browser.screenshot("login")

    await log_in(browser, console.console_url, "not-a-token")
    await sees_login_page(browser)
    assert await browser.find("#login-error")

    await log_in(browser, console.console_url, console.create_token)  # valid, but not mailbox:admin
    await sees_login_page(browser)
    assert "mailbox:admin" in await browser.text("#login-error")

    await log_in(browser, console.console_url, console.admin_token)
    await browser.wait_for("#nav-overview")
    await browser.wait_for("#throughput-chart")
    assert console.admin_token not in await page_source(browser)
    (session,) = [
        c
        for c in await asyncio.to_thread(browser.driver.get_cookies)
        if c["name"] == "courier_console"
    ]
    assert (session["httpOnly"], session["sameSite"]) == (True, "Strict"), session
    assert session["value"] != console.admin_token  # an opaque session id, never the token
    script_sees = await asyncio.to_thread(browser.driver.execute_script, "return document.cookie")
    assert console.admin_token not in script_sees


async def test_poison_of_three_kinds_is_grouped_by_reason(console: Console) -> None:
    await console.stub_behaviour(REFUSING, fixed_status=400)
    console.rejected[:] = [await console.create(index) for index in range(3)]
    await plant_poison(console.aws, console.settings)

    async def all_dead_lettered() -> bool:
        return await console.dlq_reasons() == POISON

    # The console caches a read of the DLQ for 10 s: open it once all are in.
    await eventually(all_dead_lettered, WAIT, f"the DLQ to hold {POISON}", interval=POLL)
    rows = await dead_letter_groups(console.browser, POISON)
    assert rows["target_rejected"]["target"] == REFUSING
    assert rows["target_rejected"]["op"] == create_mailbox.NAME
    assert rows["unknown_op"]["op"] == UNKNOWN_OP
    assert rows["undecryptable"]["op"] == create_mailbox.NAME
    for_the_readme(await console.browser.screenshot("dead-letters"), "console-dead-letters.png")


async def test_a_message_page_shows_the_event_with_personal_fields_masked(
    console: Console,
) -> None:
    browser = console.browser
    await dead_letter_groups(browser, POISON)
    assert len(await open_group(browser, "target_rejected")) == 3
    await browser.follow("tr.dlq-message a.message-link")
    masked = await browser.text("#masked-event")
    assert await browser.text("#reason") == "target_rejected"
    assert await browser.text("#target") == REFUSING
    assert await browser.text("#record-state") == "failed"
    assert "standard" in masked, masked  # the plan: not personal, shown as it is
    assert "J•••" in masked, masked  # the display name: its first letter, then the mask
    page = await page_source(browser)
    for index in range(3):
        for personal in (f"Jane Doe {index}", f"jane.doe{index}@example.com"):
            assert personal not in page, f"{personal!r} shown unmasked"
    await browser.screenshot("dead-letter-message")


async def test_replaying_a_group_after_fixing_its_target_completes_the_requests(
    console: Console,
) -> None:
    browser = console.browser
    assert {await console.status(rid) for rid in console.rejected} == {"failed"}
    await console.stub_behaviour(REFUSING, fixed_status=0)  # the operator fixed the target

    await dead_letter_groups(browser, POISON)
    await open_group(browser, "target_rejected")
    await set_checkbox(browser, "#dry-run", True)
    await browser.follow("#replay-submit")
    outcome = await action_outcome(browser)
    assert (outcome["state"], outcome["dry-run"], outcome["chosen"]) == ("done", "true", "3"), (
        outcome
    )
    assert await console.dlq_reasons() == POISON, "a dry run moved messages"

    await dead_letter_groups(browser, POISON)
    await open_group(browser, "target_rejected")
    await set_checkbox(browser, "#dry-run", False)
    await browser.type("#rate", "20")
    await browser.follow("#replay-submit")
    outcome = await action_outcome(browser)
    assert (outcome["state"], outcome["moved"], outcome["failed"]) == ("done", "3", "0"), outcome

    async def completed() -> bool:
        return {await console.status(rid) for rid in console.rejected} == {"completed"}

    await eventually(completed, WAIT, "the replayed requests to complete", interval=POLL)
    await dead_letter_groups(browser, AFTER_REPLAY)

    # The Requests page tells the operator the same.
    await browser.follow("#nav-requests")
    await browser.type("#request-id", console.rejected[0])
    await browser.follow("#request-lookup")
    assert await browser.text("#request-state") == "completed"
    states = await browser.find(f'tr.target-state[data-target="{REFUSING}"]')
    assert states, "the Requests page shows no state for the fixed target"
    assert await asyncio.to_thread(lambda: states[0].get_attribute("data-state")) == "delivered"


async def test_discarding_a_group_needs_the_typed_confirmation(console: Console) -> None:
    browser = console.browser
    await dead_letter_groups(browser, AFTER_REPLAY)
    await open_group(browser, "unknown_op")
    await browser.type("#confirm", "discard")  # not the phrase asked for
    await browser.follow("#discard-submit")
    assert (await action_outcome(browser))["state"] == "refused"
    assert await console.dlq_reasons() == AFTER_REPLAY, "discarded without the confirmation"

    await dead_letter_groups(browser, AFTER_REPLAY)
    await open_group(browser, "unknown_op")
    phrase = await browser.text("#confirm-phrase")
    assert phrase == f"discard {POISON['unknown_op']}"
    await browser.type("#confirm", phrase)
    await browser.follow("#discard-submit")
    outcome = await action_outcome(browser)
    assert (outcome["state"], outcome["kind"], outcome["moved"]) == ("done", "discard", "2"), (
        outcome
    )
    await dead_letter_groups(browser, AFTER_DISCARD)
    assert await console.dlq_reasons() == AFTER_DISCARD


async def test_a_forged_post_without_the_csrf_token_gets_403(console: Console) -> None:
    browser = console.browser
    await dead_letter_groups(browser, AFTER_DISCARD)
    await open_group(browser, "undecryptable")
    action = await browser.attribute("#discard-form", "action")
    fields = await asyncio.to_thread(
        lambda: {
            str(e.get_attribute("name")): str(e.get_attribute("value") or "")
            for e in browser.driver.find_elements(By.CSS_SELECTOR, "#discard-form [name]")
        }
    )
    assert fields.get("csrf"), f"the discard form carries no csrf field: {sorted(fields)}"
    forged = {name: value for name, value in fields.items() if name != "csrf"}
    forged["confirm"] = await browser.text("#confirm-phrase")
    # The signed-in operator's own cookie: only the CSRF token is missing or wrong.
    cookie = "; ".join(f"{name}={value}" for name, value in (await browser.cookies()).items())
    for data in (forged, {**forged, "csrf": "0" * 40}):
        async with console.http.post(
            action, data=data, headers={"Cookie": cookie}, allow_redirects=False
        ) as response:
            assert response.status == 403, (sorted(data), response.status, await response.text())
    assert await console.dlq_reasons() == AFTER_DISCARD


async def test_the_targets_and_secrets_pages_show_state_never_a_secret(console: Console) -> None:
    browser = console.browser
    await browser.follow("#nav-targets")
    await browser.wait_for("#targets")
    rows = await browser.find("#targets tr.target")
    circuits = {
        await asyncio.to_thread(lambda row=row: row.get_attribute("data-target") or ""): (
            await asyncio.to_thread(lambda row=row: row.get_attribute("data-circuit") or "")
        )
        for row in rows
    }
    assert circuits == {t.name: "closed" for t in console.settings.targets}, circuits
    await browser.screenshot("targets")

    await browser.follow("#nav-secrets")
    await browser.wait_for("#secrets")
    store = CredStash.from_settings(console.aws.dynamodb, console.aws.kms, console.settings.secrets)
    page = await page_source(browser)
    for name in (console.settings.auth.hs256_secret, console.settings.idm.api_key_secret):
        assert await browser.find(f'#secrets tr.secret[data-name="{name}"]'), f"{name} not listed"
        assert await store.get(name) not in page, f"the value of {name} is on the page"
    await browser.screenshot("secrets")


async def test_the_chart_moves_while_load_runs(console: Console) -> None:
    browser = console.browser
    await browser.follow("#nav-overview")
    before = int(await browser.attribute("#throughput-chart", "data-points") or 0)

    async def load() -> None:
        for index in range(1000, 1200):  # until the chart has moved (cancelled then)
            await console.create(index)
            await asyncio.sleep(0.05)

    def points() -> int:
        chart = browser.driver.find_element(By.ID, "throughput-chart")
        return int(chart.get_attribute("data-points") or 0)

    running = asyncio.create_task(load())
    try:
        # No reload: the page's own script redraws the chart from /overview.json.
        await browser.wait_until(
            lambda: points() > before + 1, WAIT, f"the chart's points to grow past {before + 1}"
        )
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    assert await browser.find("#throughput-chart polyline.completed"), "no line of completions"
    for_the_readme(await browser.screenshot("overview"), "console-overview.png")


async def test_no_page_broke_a_script_or_the_content_security_policy(console: Console) -> None:
    """Over the whole session: no script error and nothing the Content-Security-Policy refused
    (the log the browser kept of every page the tests above opened)."""
    broken = [
        line
        for line in await console.browser.log()
        if "Content Security Policy" in line or "Uncaught" in line
    ]
    assert not broken, broken
