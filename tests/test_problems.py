"""Every error a client can get is ``application/problem+json``, with nothing internal in it.

Two kinds of errors never pass through courier's handlers' own checks: an unexpected exception
in a handler (a 500) and a request aiohttp's HTTP parser refuses before any handler runs
(malformed request line, bad header, oversized header, bad chunked encoding). Both are sent
here over HTTP, the parser cases as raw bytes on a socket, and checked as a client sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from courier_testkit.tokens import mint_token
from service import daemon
from service.aws import AwsClients
from service.bootstrap import Resources
from service.settings import AwsSettings, Settings, load_settings
from tests.conftest import DEMO_SECRETS
from tests.test_app import on_free_port

PROBLEM_JSON = "application/problem+json"
# Words of a Python traceback or of aiohttp's parser errors: none may reach a client.
INTERNALS = (
    "Traceback",
    'File "',
    ".py",
    "Error:",
    "aiohttp",
    "Got more than",
    "Bad status line",
    "Invalid header",
    "Invalid method",
    "Invalid character",
    "Can not decode",
    "Not enough data",
    "<html",
)


@dataclass
class Answer:
    """An HTTP answer as bytes on the wire, split up."""

    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool = False  # the server closed the connection after it

    @classmethod
    def parse(cls, raw: bytes) -> Answer:
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith(("HTTP/1.1 ", "HTTP/1.0 ")), raw[:300]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", len(body)))
        return cls(int(lines[0].split()[1]), headers, body[:length])

    def __str__(self) -> str:
        return f"{self.status} {self.headers} {self.body[:300]!r}"

    def problem(self) -> dict[str, Any]:
        """The problem document, after checking what every problem answer must carry."""
        text = self.body.decode()
        assert self.headers.get("content-type") == PROBLEM_JSON, (self.headers, text)
        for word in INTERNALS:
            assert word not in text, f"{word!r} reaches the client: {text}"
        document: dict[str, Any] = json.loads(text)
        assert document["type"].startswith("urn:courier:problem:"), document
        assert document["status"] == self.status, document
        assert isinstance(document["title"], str), document
        assert document["title"]
        assert isinstance(document["detail"], str), document
        assert document["detail"]
        assert document["request_id"] == self.headers.get("x-request-id"), (document, self.headers)
        return document


async def exchange(url: str, request: bytes, read_timeout: float = 10) -> Answer:
    """Send raw ``request`` bytes on a fresh connection; the answer, read until the server
    closes the connection."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        chunks = []
        closed = False
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(read_timeout):
                while data := await reader.read(65536):
                    chunks.append(data)
                closed = True
        answer = Answer.parse(b"".join(chunks))
        answer.closed = closed
        return answer
    finally:
        writer.transport.abort()


@pytest.fixture(scope="module")
def shared(aws_settings: AwsSettings, resources: Resources) -> Settings:
    """Settings on the session's resources: these tests leave nothing behind to isolate."""
    base = load_settings(environ={"COURIER_HTTP_CLOSE_GRACE_SECONDS": "0.1"})
    return resources.apply_to(base.replace(aws=aws_settings))


@pytest.fixture(scope="module")
async def api(shared: Settings) -> AsyncIterator[str]:
    """One API for the module."""
    async with daemon.serving(on_free_port(shared)) as listening:
        yield listening.url


def token(settings: Settings, subject: str = "tester") -> str:
    key = DEMO_SECRETS["courier.jwt.hs256"]
    return mint_token(key, settings.auth, subject=subject, lifetime_seconds=600)


# --- a 500 ----------------------------------------------------------------------------------


async def test_an_unexpected_exception_is_a_500_problem_without_internals(
    shared: Settings,
    resources: Resources,
    aws: AwsClients,
    api: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A status record in a state this courier does not know (written by a newer version, or
    # by hand): reading it raises deep inside the handler.
    request_id = uuid.uuid4().hex
    marker = f"zz-unknown-state-{uuid.uuid4().hex[:6]}"
    await aws.dynamodb.put_item(
        TableName=resources.status_table,
        Item={
            "pk": {"S": f"req#{request_id}"},
            "op": {"S": "create-mailbox"},
            "state": {"S": marker},
            "subject": {"S": "tester"},
            "created_at": {"S": "2026-01-01T00:00:00Z"},
            "updated_at": {"S": "2026-01-01T00:00:00Z"},
        },
    )
    caplog.set_level(logging.ERROR, logger="courier.api")
    request = (
        f"GET /v1/requests/{request_id} HTTP/1.1\r\n"
        "Host: courier\r\n"
        f"Authorization: Bearer {token(shared)}\r\n"
        "Accept: text/html\r\n"  # aiohttp's own 500 page would be HTML, with a traceback
        "X-Request-Id: quote-me-500\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    answer = await exchange(api, request)
    assert answer.status == 500
    document = answer.problem()
    assert document == {
        "type": "urn:courier:problem:internal-error",
        "title": "Internal Server Error",
        "status": 500,
        "detail": "courier failed to handle the request; quote the request_id when reporting it.",
        "request_id": "quote-me-500",
    }
    assert marker not in answer.body.decode()
    # The operator gets what the client does not: the exception, in the log.
    logged = [r.exc_info for r in caplog.records if r.name == "courier.api" and r.exc_info]
    assert len(logged) == 1, caplog.records
    assert marker in str(logged[0][1])


# --- refused by the HTTP parser --------------------------------------------------------------

SECRET = "s3cr3t-" + uuid.uuid4().hex[:8]  # in each malformed request: must not be echoed

PARSER_ERRORS = {
    "tls-on-plain-port": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
    + SECRET.encode()
    + b"\r\n\r\n",
    "bad-method": f"G(T /healthz?{SECRET} HTTP/1.1\r\nHost: courier\r\n\r\n".encode(),
    "bad-request-line": f"GET /healthz?{SECRET} HTTP/1.1 extra\r\nHost: courier\r\n\r\n".encode(),
    "bad-version": f"GET /healthz?{SECRET} HTTP/7.3\r\nHost: courier\r\n\r\n".encode(),
    "header-without-colon": f"GET /healthz HTTP/1.1\r\nHost: courier\r\n{SECRET}\r\n\r\n".encode(),
    "space-in-header-name": f"GET /healthz HTTP/1.1\r\nHost: courier\r\nX {SECRET}: y\r\n\r\n".encode(),
    "oversized-header": (
        f"GET /healthz HTTP/1.1\r\nHost: courier\r\nX-Big: {SECRET}{'a' * 20000}\r\n\r\n".encode()
    ),
    "oversized-request-line": f"GET /healthz?{SECRET}{'a' * 10000} HTTP/1.1\r\n\r\n".encode(),
}


@pytest.mark.parametrize("case", sorted(PARSER_ERRORS))
async def test_a_request_the_parser_refuses_is_a_400_problem(api: str, case: str) -> None:
    answer = await exchange(api, PARSER_ERRORS[case])
    assert answer.status == 400, (case, answer)
    document = answer.problem()
    assert document["type"] == "urn:courier:problem:malformed-request", document
    assert document["title"] == "Bad Request"
    assert SECRET not in answer.body.decode()
    assert answer.closed  # nothing after a request that could not be parsed can be trusted


def chunked_post(settings: Settings, body: bytes) -> bytes:
    head = (
        "POST /v1/mailboxes HTTP/1.1\r\n"
        "Host: courier\r\n"
        f"Authorization: Bearer {token(settings)}\r\n"
        "Content-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n"
        "X-Request-Id: chunked-1\r\n\r\n"
    )
    return head.encode() + body


BAD_CHUNKS = {
    "chunk-size-not-hex": b"zz\r\n{}\r\n0\r\n\r\n",
    "chunk-longer-than-its-size": b"2\r\n{}{}{}\r\n0\r\n\r\n",
    "chunk-size-with-junk": b"2 junk junk\r\n{}\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(BAD_CHUNKS))
async def test_bad_chunked_encoding_is_a_400_problem(api: str, shared: Settings, case: str) -> None:
    answer = await exchange(api, chunked_post(shared, BAD_CHUNKS[case]))
    assert answer.status == 400, (case, answer)
    document = answer.problem()
    assert document["type"] == "urn:courier:problem:malformed-request", document
    assert document["title"] == "Bad Request"
    assert answer.closed


async def test_bad_chunk_once_the_body_is_being_read_is_a_problem_within_the_body_timeout(
    shared: Settings,
) -> None:
    """aiohttp's C parser drops a body it finds malformed half-way without telling the reader
    (aiohttp 3.14.5), so the handler sees a body that stops arriving: the answer is the body
    timeout's 408 problem, not a 400, and only once ``http.body_timeout_seconds`` passed."""
    quick = shared.replace(http=dataclasses.replace(shared.http, body_timeout_seconds=1))
    async with daemon.serving(on_free_port(quick)) as listening:
        host, port = listening.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(chunked_post(shared, b"1\r\n{\r\n"))
            await writer.drain()
            await asyncio.sleep(0.3)  # the handler is reading the body by now
            writer.write(b"zz\r\n}\r\n0\r\n\r\n")
            await writer.drain()
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"Content-Length: (\d+)", head)[1])  # type: ignore[index]
                body = await reader.readexactly(length)
        finally:
            writer.transport.abort()
    answer = Answer.parse(head + body)
    assert answer.status == 408, answer
    assert answer.problem()["type"] == "urn:courier:problem:body-timeout"
