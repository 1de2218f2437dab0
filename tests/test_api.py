"""POST /v1/mailboxes and GET /v1/requests/{id} over real HTTP, against moto and a stub IdM.

Every error test checks the whole problem+json document a client sees, and that nothing was
accepted: no message in the queue and no status record.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import aiohttp
import jwt
import pytest
from aiohttp import web, web_app
from multidict import CIMultiDict

from courier_testkit.ports import free_port
from courier_testkit.tcpproxy import TcpProxy
from courier_testkit.tokens import mint_token
from service import daemon
from service.aws import AwsClients
from service.bootstrap import ResourceNames, Resources, bootstrap
from service.envelope import EnvelopeCipher
from service.settings import AwsSettings, Settings, load_settings
from service.status import RequestState, StatusStore
from service.stubs import Behaviour, IdmStub
from tests.conftest import DEMO_SECRETS

HS256_KEY = DEMO_SECRETS["courier.jwt.hs256"]
VALID_BODY = {
    "username": "jane.doe",
    "display_name": "Jane Doe",
    "plan": "standard",
    "contact_email": "jane@example.com",
}
REALM = 'Bearer realm="courier"'
PROBLEM_JSON = "application/problem+json"


class Reply(NamedTuple):
    """What a client got back: status, headers and the parsed body (text when not JSON)."""

    status: int
    headers: CIMultiDict[str]
    body: Any


@dataclass
class Api:
    """A running courier API with its stub IdM and AWS resources."""

    url: str
    settings: Settings
    resources: Resources
    idm: IdmStub
    http: aiohttp.ClientSession
    aws: AwsClients
    app: web.Application | None = field(default=None, repr=False)

    def token(self, scopes: str = "mailbox:create mailbox:read", **overrides: Any) -> str:
        return mint_token(
            HS256_KEY, self.settings.auth, scopes=scopes, lifetime_seconds=300, **overrides
        )

    async def post(
        self,
        body: Any = VALID_BODY,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        all_headers = {"Authorization": f"Bearer {token or self.token()}", **(headers or {})}
        async with self.http.post(
            f"{self.url}/v1/mailboxes", json=body, headers=all_headers
        ) as response:
            return await _reply(response)

    async def call(
        self,
        method: str,
        path: str,
        *,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        authorization: str | None = "default",
    ) -> Reply:
        """Any request; ``authorization`` "default" sends a valid token, None sends none."""
        all_headers = dict(headers or {})
        if authorization == "default":
            all_headers["Authorization"] = f"Bearer {self.token()}"
        elif authorization is not None:
            all_headers["Authorization"] = authorization
        async with self.http.request(
            method, f"{self.url}{path}", data=data, headers=all_headers
        ) as response:
            return await _reply(response)

    async def post_raw(self, data: bytes, content_type: str = "application/json") -> Reply:
        return await self.call(
            "POST", "/v1/mailboxes", data=data, headers={"Content-Type": content_type}
        )

    async def queued(self) -> list[dict[str, Any]]:
        response = await self.aws.sqs.receive_message(
            QueueUrl=self.resources.queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=0,
            MessageAttributeNames=["All"],
            VisibilityTimeout=0,
        )
        return list(response.get("Messages", []))

    async def drain_queue(self) -> list[dict[str, Any]]:
        """Every message in the queue (received until empty; they stay invisible for a minute)."""
        messages: list[dict[str, Any]] = []
        while True:
            response = await self.aws.sqs.receive_message(
                QueueUrl=self.resources.queue_url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=0,
                MessageAttributeNames=["All"],
                VisibilityTimeout=60,
            )
            batch = response.get("Messages", [])
            if not batch:
                return messages
            messages += batch

    async def status_records(self) -> list[dict[str, Any]]:
        """Every item of the status table, read straight from moto."""
        response = await self.aws.dynamodb.scan(TableName=self.resources.status_table)
        return list(response.get("Items", []))

    async def assert_nothing_accepted(self) -> None:
        assert await self.queued() == []
        assert await self.status_records() == []


async def _reply(response: aiohttp.ClientResponse) -> Reply:
    text = await response.text()
    try:
        body: Any = await response.json(content_type=None)
    except ValueError:
        body = text
    return Reply(response.status, CIMultiDict(response.headers), body)


def assert_problem(
    reply: Reply, status: int, slug: str, title: str, detail: str, **extra: Any
) -> None:
    """``reply`` is exactly this problem+json document, with the request's correlation id."""
    assert reply.status == status, reply.body
    assert reply.headers["Content-Type"] == PROBLEM_JSON
    assert reply.body == {
        "type": f"urn:courier:problem:{slug}",
        "title": title,
        "status": status,
        "detail": detail,
        "request_id": reply.headers["X-Request-Id"],
        **extra,
    }


def api_settings(settings: Settings, idm_url: str) -> Settings:
    return settings.replace(
        http=dataclasses.replace(settings.http, port=0, drain_seconds=2),
        idm=dataclasses.replace(settings.idm, url=idm_url, timeout_seconds=0.5, retries=1),
        role="api",
    )


@contextlib.asynccontextmanager
async def running_api(
    settings: Settings,
    resources: Resources,
    aws: AwsClients,
    *,
    aws_settings: AwsSettings | None = None,
) -> AsyncIterator[Api]:
    """courier (role=api) with a fresh stub IdM; ``aws_settings`` overrides where AWS is."""
    idm = IdmStub(api_key=DEMO_SECRETS["courier.idm.api_key"])
    try:
        async with idm.serving() as idm_url:
            configured = api_settings(settings, idm_url)
            if aws_settings is not None:
                configured = configured.replace(aws=aws_settings)
            async with daemon.serving(configured) as listening, aiohttp.ClientSession() as http:
                yield Api(listening.url, configured, resources, idm, http, aws, listening.app)
    finally:
        web_app._cached_build_middleware.cache_clear()  # see conftest._release_stopped_apps


@pytest.fixture
async def api(settings: Settings, fresh: Resources, aws: AwsClients) -> AsyncIterator[Api]:
    async with running_api(settings, fresh, aws) as running:
        yield running


async def own_resources(aws: AwsClients, aws_settings: AwsSettings) -> tuple[Settings, Resources]:
    """Fresh queues and tables for a module-scoped API (conftest's ``fresh`` is per test)."""
    names = ResourceNames(prefix=f"m{os.getpid()}-{uuid.uuid4().hex[:8]}")
    resources = await bootstrap(aws, names, DEMO_SECRETS)
    return resources.apply_to(load_settings(environ={}).replace(aws=aws_settings)), resources


@pytest.fixture(scope="module")
async def shared_api(aws_settings: AwsSettings, aws: AwsClients) -> AsyncIterator[Api]:
    """One API for the module's tests that only send requests courier must refuse."""
    settings, resources = await own_resources(aws, aws_settings)
    async with running_api(settings, resources, aws) as running:
        yield running


@pytest.fixture
def rejecting_api(shared_api: Api) -> Api:
    """The shared API with its IdM stub reset; its tests assert that nothing was accepted."""
    idm = shared_api.idm
    idm.behaviour = Behaviour()
    idm.api_key = DEMO_SECRETS["courier.idm.api_key"]
    for record in (idm.calls, idm.identities, idm.by_key, idm.effects):
        record.clear()
    return shared_api


# --- the happy path ----------------------------------------------------------------------------


async def test_happy_path_queues_one_decryptable_message(api: Api) -> None:
    status, headers, body = await api.post()
    assert status == 202, body
    request_id = body["request_id"]
    assert body == {"request_id": request_id, "status": "accepted"}
    assert headers["Location"] == f"/v1/requests/{request_id}"
    messages = await api.queued()
    assert len(messages) == 1
    attributes = {k: v["StringValue"] for k, v in messages[0]["MessageAttributes"].items()}
    assert attributes["op"] == "create-mailbox"
    assert attributes["request_id"] == request_id
    assert attributes["traceparent"].startswith("00-")
    assert "jane" not in messages[0]["Body"]  # no plaintext personal data in the queue
    opened = await EnvelopeCipher(api.aws.kms, api.settings.envelope).open(messages[0]["Body"])
    assert opened.id == request_id
    assert opened.payload["mailbox"]["username"] == "jane.doe"
    assert opened.payload["mailbox"]["quota_mb"] == 10240
    assert opened.payload["identity_id"] == api.idm.identities["jane.doe"]
    async with api.http.get(
        f"{api.url}{headers['Location']}", headers={"Authorization": f"Bearer {api.token()}"}
    ) as response:
        assert response.status == 200
        record = await response.json()
    assert record["status"] == "accepted"
    assert record["identity_id"] == api.idm.identities["jane.doe"]
    assert record["request_id"] == request_id
    assert api.idm.calls[0].idempotency_key == request_id


async def test_traceparent_and_request_id_are_propagated(api: Api) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    reply = await api.post(headers={"traceparent": traceparent, "X-Request-Id": "client-42"})
    assert reply.status == 202
    assert reply.headers["X-Request-Id"] == "client-42"
    (message,) = await api.queued()
    assert message["MessageAttributes"]["traceparent"]["StringValue"] == traceparent


# --- authentication end to end -----------------------------------------------------------------


async def test_expired_token_is_401(rejecting_api: Api) -> None:
    reply = await rejecting_api.post(token=rejecting_api.token(exp=int(time.time()) - 3600))
    assert_problem(reply, 401, "invalid-token", "Unauthorized", "the token has expired")
    assert reply.headers["WWW-Authenticate"] == f'{REALM}, error="invalid_token"'
    assert rejecting_api.idm.calls == []
    await rejecting_api.assert_nothing_accepted()


async def test_missing_scope_is_403(rejecting_api: Api) -> None:
    reply = await rejecting_api.post(token=rejecting_api.token("mailbox:read"))
    assert_problem(
        reply,
        403,
        "insufficient-scope",
        "Forbidden",
        "the token lacks the scope 'mailbox:create'",
    )
    assert (
        reply.headers["WWW-Authenticate"]
        == f'{REALM}, error="insufficient_scope", scope="mailbox:create"'
    )
    assert rejecting_api.idm.calls == []
    await rejecting_api.assert_nothing_accepted()


async def test_alg_none_is_401(rejecting_api: Api) -> None:
    unsigned = jwt.encode(
        jwt.decode(rejecting_api.token(), options={"verify_signature": False}),
        None,
        algorithm="none",
    )
    reply = await rejecting_api.post(token=unsigned)
    assert_problem(
        reply, 401, "invalid-token", "Unauthorized", "tokens signed with 'none' are not accepted"
    )
    assert reply.headers["WWW-Authenticate"] == f'{REALM}, error="invalid_token"'
    await rejecting_api.assert_nothing_accepted()


async def test_missing_authorization_is_401_without_error_code(rejecting_api: Api) -> None:
    reply = await rejecting_api.call("POST", "/v1/mailboxes", data=b"{}", authorization=None)
    assert_problem(
        reply,
        401,
        "invalid-token",
        "Unauthorized",
        "an 'Authorization: Bearer <token>' header is required",
    )
    assert reply.headers["WWW-Authenticate"] == REALM
    await rejecting_api.assert_nothing_accepted()


# --- request bodies ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        pytest.param(
            b'{"username": ',
            "the body is not valid JSON: Expecting value: line 1 column 14 (char 13)",
            id="truncated",
        ),
        pytest.param(
            b"", "the body is not valid JSON: Expecting value: line 1 column 1 (char 0)", id="empty"
        ),
        pytest.param(
            b'{"username": "a", "username": "b"}',
            "the JSON has a duplicate key 'username'",
            id="duplicate-key",
        ),
        pytest.param(
            b'{"display_name": "Jos\xe9"}', "the body is not valid UTF-8", id="invalid-utf-8"
        ),
        pytest.param(b"[" * 60_000, "the JSON is nested too deeply", id="deep-unclosed"),
        pytest.param(
            b"[" * 30_000 + b"]" * 30_000, "the JSON is nested too deeply", id="deep-balanced"
        ),
        pytest.param(
            b'{"a": ' * 5_000 + b"1" + b"}" * 5_000,
            "the JSON is nested too deeply",
            id="deep-objects",
        ),
        pytest.param(
            b'{"quota_mb": NaN}',
            "the body is not valid JSON: 'NaN' is not a JSON value",
            id="nan",
        ),
        pytest.param(
            b'{"quota_mb": -Infinity}',
            "the body is not valid JSON: '-Infinity' is not a JSON value",
            id="infinity",
        ),
    ],
)
async def test_malformed_body_is_400(rejecting_api: Api, data: bytes, detail: str) -> None:
    reply = await rejecting_api.post_raw(data)
    assert_problem(reply, 400, "malformed-json", "Bad Request", detail)
    assert rejecting_api.idm.calls == []
    await rejecting_api.assert_nothing_accepted()


@pytest.mark.parametrize(
    ("content_type", "shown"),
    [
        ("text/plain", "'text/plain'"),
        ("application/x-www-form-urlencoded", "'application/x-www-form-urlencoded'"),
        ("application/problem+json", "'application/problem+json'"),
    ],
)
async def test_wrong_content_type_is_415(rejecting_api: Api, content_type: str, shown: str) -> None:
    reply = await rejecting_api.post_raw(b'{"username": "jane.doe"}', content_type)
    assert_problem(
        reply,
        415,
        "unsupported-media-type",
        "Unsupported Media Type",
        f"the body must be application/json, not {shown}",
    )
    await rejecting_api.assert_nothing_accepted()


async def test_json_with_charset_parameter_is_accepted(api: Api) -> None:
    import json

    reply = await api.post_raw(json.dumps(VALID_BODY).encode(), "application/json; charset=utf-8")
    assert reply.status == 202, reply.body


async def test_oversize_body_is_413(rejecting_api: Api) -> None:
    assert rejecting_api.settings.http.max_body_bytes == 64 * 1024
    padding = "x" * (64 * 1024)
    data = f'{{"display_name": "{padding}"}}'.encode()
    reply = await rejecting_api.post_raw(data)
    assert_problem(
        reply,
        413,
        "payload-too-large",
        "Request Entity Too Large",
        "Maximum request body size 65536 exceeded.",
    )
    assert rejecting_api.idm.calls == []
    await rejecting_api.assert_nothing_accepted()


async def test_schema_violations_are_422_with_every_error(rejecting_api: Api) -> None:
    body = {
        "username": "X",
        "display_name": "",
        "plan": "gold",
        "contact_email": "nope",
        "quota_mb": 5,
        "extra": 1,
    }
    reply = await rejecting_api.post(body)
    assert_problem(
        reply,
        422,
        "validation-failed",
        "Unprocessable Content",
        "the request body does not match the CreateMailboxRequest schema (7 errors)",
        errors=[
            {
                "pointer": "",
                "message": "Additional properties are not allowed ('extra' was unexpected)",
            },
            {"pointer": "/contact_email", "message": "'nope' is not a 'email'"},
            {
                "pointer": "/contact_email",
                "message": "'nope' does not match '^[^@\\\\s]+@[^@\\\\s]+\\\\.[^@\\\\s]+$'",
            },
            {"pointer": "/display_name", "message": "'' should be non-empty"},
            {
                "pointer": "/plan",
                "message": "'gold' is not one of ['basic', 'standard', 'premium']",
            },
            {"pointer": "/quota_mb", "message": "5 is less than the minimum of 100"},
            {"pointer": "/username", "message": "'X' does not match '^[a-z][a-z0-9._-]{2,31}$'"},
        ],
    )
    assert rejecting_api.idm.calls == []
    await rejecting_api.assert_nothing_accepted()


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        pytest.param([], [{"pointer": "", "message": "[] is not of type 'object'"}], id="array"),
        pytest.param(
            {k: v for k, v in VALID_BODY.items() if k != "plan"},
            [{"pointer": "", "message": "'plan' is a required property"}],
            id="missing-plan",
        ),
        pytest.param(
            {**VALID_BODY, "aliases": ["ok.alias", "Bad"]},
            [
                {
                    "pointer": "/aliases/1",
                    "message": "'Bad' does not match '^[a-z][a-z0-9._-]{2,31}$'",
                }
            ],
            id="array-item",
        ),
        pytest.param(
            {**VALID_BODY, "username": "jane\n"},
            [
                {
                    "pointer": "/username",
                    "message": "'jane\\n' does not match '^[a-z][a-z0-9._-]{2,31}$'",
                }
            ],
            id="trailing-newline",
        ),
    ],
)
async def test_schema_violation_pointers(
    rejecting_api: Api, body: Any, errors: list[dict[str, str]]
) -> None:
    reply = await rejecting_api.post(body)
    assert reply.status == 422
    assert reply.body["errors"] == errors
    await rejecting_api.assert_nothing_accepted()


# --- the identity back-end ---------------------------------------------------------------------


async def test_existing_identity_is_409(rejecting_api: Api) -> None:
    rejecting_api.idm.identities["jane.doe"] = "idm-taken"
    reply = await rejecting_api.post()
    assert_problem(
        reply, 409, "identity-exists", "Conflict", "an identity with this username already exists"
    )
    assert len(rejecting_api.idm.calls) == 1  # a conflict is final: no retry
    await rejecting_api.assert_nothing_accepted()


async def test_idm_down_is_502_after_bounded_retries(rejecting_api: Api) -> None:
    rejecting_api.idm.behaviour.down = True
    reply = await rejecting_api.post()
    assert_problem(
        reply,
        502,
        "idm-failed",
        "Bad Gateway",
        "the identity back-end failed: the IdM answered 503",
    )
    assert len(rejecting_api.idm.calls) == 1 + rejecting_api.settings.idm.retries
    assert (
        len({call.idempotency_key for call in rejecting_api.idm.calls}) == 1
    )  # every attempt, one key
    await rejecting_api.assert_nothing_accepted()


async def test_idm_timeout_is_504(rejecting_api: Api) -> None:
    rejecting_api.idm.behaviour.latency_seconds = rejecting_api.settings.idm.timeout_seconds + 0.3
    started = time.monotonic()
    reply = await rejecting_api.post()
    elapsed = time.monotonic() - started
    assert_problem(
        reply, 504, "idm-timeout", "Gateway Timeout", "the identity back-end did not answer in time"
    )
    assert len(rejecting_api.idm.calls) == 1 + rejecting_api.settings.idm.retries
    # Bounded: every attempt's timeout, plus slack for a loaded machine (the 504 itself shows
    # the timeout applied: the IdM would have answered 0.3 s later).
    assert (
        elapsed
        < (1 + rejecting_api.settings.idm.retries) * rejecting_api.settings.idm.timeout_seconds + 3
    )
    await rejecting_api.assert_nothing_accepted()


async def test_idm_rejecting_our_api_key_is_502(rejecting_api: Api) -> None:
    rejecting_api.idm.api_key = "a-key-courier-does-not-have"
    reply = await rejecting_api.post()
    assert_problem(
        reply,
        502,
        "idm-failed",
        "Bad Gateway",
        "the identity back-end failed: the IdM rejected the identity (401)",
    )
    assert len(rejecting_api.idm.calls) == 1  # a 4xx will not get better by retrying
    await rejecting_api.assert_nothing_accepted()


async def test_idm_recovering_between_attempts_is_202(api: Api) -> None:
    api.idm.behaviour.failure_rate = 1.0
    api.idm.behaviour.failure_status = 500

    async def recover() -> None:
        while not api.idm.calls:
            await asyncio.sleep(0.001)
        api.idm.behaviour.failure_rate = 0.0

    recovery = asyncio.create_task(recover())
    reply = await api.post()
    await recovery
    assert reply.status == 202, reply.body
    assert len(api.idm.calls) == 2
    assert len(api.idm.identities) == 1


# --- AWS outages -------------------------------------------------------------------------------


async def test_sqs_unreachable_is_503_and_the_record_says_send_failed(
    settings: Settings, fresh: Resources, aws: AwsClients, aws_settings: AwsSettings
) -> None:
    broken = dataclasses.replace(
        aws_settings,
        sqs_endpoint_url=f"http://127.0.0.1:{free_port()}",
        connect_timeout_seconds=0.2,
        read_timeout_seconds=1,
    )
    async with running_api(settings, fresh, aws, aws_settings=broken) as api:
        reply = await api.post()
        assert_problem(
            reply,
            503,
            "service-unavailable",
            "Service Unavailable",
            "a service courier depends on is unavailable; retry later",
        )
        assert reply.headers["Retry-After"] == "2"
        assert len(api.idm.calls) == 1  # the identity exists; a retry with the same key reuses it
        assert await api.queued() == []
        # The record stays (the role may not delete), saying the message was never queued.
        (record,) = await api.status_records()
        assert record["state"]["S"] == "send_failed"
        assert record["identity_id"]["S"] == api.idm.identities["jane.doe"]


async def test_status_table_unreachable_is_503_and_nothing_is_queued(
    settings: Settings, fresh: Resources, aws: AwsClients, aws_settings: AwsSettings
) -> None:
    proxy = TcpProxy(aws_settings.endpoint_url)
    dynamodb = dataclasses.replace(
        aws_settings,
        dynamodb_endpoint_url=await proxy.start(),
        connect_timeout_seconds=0.2,
        read_timeout_seconds=1,
    )
    try:
        async with running_api(settings, fresh, aws, aws_settings=dynamodb) as api:
            first = await api.post()  # loads the secrets (CredStash is DynamoDB too)
            assert first.status == 202, first.body
            await proxy.close()
            reply = await api.post({**VALID_BODY, "username": "john.doe"})
            assert_problem(
                reply,
                503,
                "service-unavailable",
                "Service Unavailable",
                "a service courier depends on is unavailable; retry later",
            )
            assert reply.headers["Retry-After"] == "2"
            keyed = await api.post(
                {**VALID_BODY, "username": "jim.doe"}, headers={"Idempotency-Key": "k-1"}
            )
            assert keyed.status == 503
            assert len(api.idm.calls) == 2  # the keyed request stopped at its claim
            records = await api.status_records()
            assert [item["pk"]["S"] for item in records] == [f"req#{first.body['request_id']}"]
            messages = await api.drain_queue()
            assert [m["MessageAttributes"]["request_id"]["StringValue"] for m in messages] == [
                first.body["request_id"]
            ]
    finally:
        await proxy.close()


# --- idempotency -------------------------------------------------------------------------------


async def test_retry_with_same_key_and_body_replays(api: Api) -> None:
    headers = {"Idempotency-Key": "order-1"}
    first = await api.post(headers=headers)
    second = await api.post(headers=headers)
    assert first.status == second.status == 202
    assert (
        first.body == second.body == {"request_id": first.body["request_id"], "status": "accepted"}
    )
    assert second.headers["Location"] == first.headers["Location"]
    assert len(api.idm.calls) == 1
    assert len(await api.status_records()) == 1
    # A replay answers from the record: the first answer's message is the only one.
    messages = await api.drain_queue()
    assert [m["MessageAttributes"]["request_id"]["StringValue"] for m in messages] == [
        first.body["request_id"]
    ]


async def test_replay_of_a_finished_request_does_not_resend(api: Api) -> None:
    headers = {"Idempotency-Key": "order-2"}
    first = await api.post(headers=headers)
    store = StatusStore(api.aws.dynamodb, api.resources.status_table, 1)
    await store.update(first.body["request_id"], state=RequestState.COMPLETED)
    second = await api.post(headers=headers)
    assert second.status == 202
    assert second.body == {"request_id": first.body["request_id"], "status": "completed"}
    assert len(await api.drain_queue()) == 1
    assert len(api.idm.calls) == 1


async def test_same_key_with_different_body_is_422(api: Api) -> None:
    headers = {"Idempotency-Key": "order-3"}
    assert (await api.post(headers=headers)).status == 202
    reply = await api.post({**VALID_BODY, "plan": "premium"}, headers=headers)
    assert_problem(
        reply,
        422,
        "idempotency-key-reused",
        "Unprocessable Content",
        "this Idempotency-Key was already used with a different request body",
    )
    assert len(api.idm.calls) == 1
    assert len(await api.status_records()) == 1
    assert len(await api.drain_queue()) == 1


async def test_key_order_does_not_change_the_body_hash(api: Api) -> None:
    headers = {"Idempotency-Key": "order-4"}
    first = await api.post(headers=headers)
    reordered = dict(reversed(list(VALID_BODY.items())))
    second = await api.post(reordered, headers=headers)
    assert second.status == 202
    assert second.body["request_id"] == first.body["request_id"]


async def test_racing_duplicates_share_one_request(api: Api) -> None:
    headers = {"Idempotency-Key": "race-1"}
    replies = await asyncio.gather(*(api.post(headers=headers) for _ in range(10)))
    # One call claims the key; the others wait for its answer (202) or, if it takes longer
    # than their wait, are told to retry (409 + Retry-After) — all about the one request.
    assert {r.status for r in replies} <= {202, 409}, [r.body for r in replies]
    records = await api.status_records()
    request_id = records[0]["pk"]["S"].removeprefix("req#")
    assert len(records) == 1
    for reply in replies:
        if reply.status == 202:
            assert reply.body == {"request_id": request_id, "status": "accepted"}
        else:
            assert reply.headers["Retry-After"] == "1"
            assert reply.headers["Location"] == f"/v1/requests/{request_id}"
    assert [call.idempotency_key for call in api.idm.calls] == [request_id]
    messages = await api.drain_queue()
    assert [m["MessageAttributes"]["request_id"]["StringValue"] for m in messages] == [request_id]


async def test_same_key_from_another_caller_is_another_request(api: Api) -> None:
    headers = {"Idempotency-Key": "shared-key"}
    mine = await api.post(headers=headers)
    theirs = await api.post(
        {**VALID_BODY, "username": "john.doe"}, token=api.token(sub="someone-else"), headers=headers
    )
    assert mine.status == theirs.status == 202
    assert mine.body["request_id"] != theirs.body["request_id"]


@pytest.mark.parametrize("key", ["k" * 256, "k" * 300, "with space", "tab\there", "é"])
async def test_invalid_idempotency_key_is_400(rejecting_api: Api, key: str) -> None:
    reply = await rejecting_api.post(headers={"Idempotency-Key": key})
    assert_problem(
        reply,
        400,
        "invalid-idempotency-key",
        "Bad Request",
        "Idempotency-Key must be 1 to 255 visible ASCII characters",
    )
    assert rejecting_api.idm.calls == []
    await rejecting_api.assert_nothing_accepted()


# --- GET /v1/requests/{id} ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_id",
    [
        "0123456789abcdef0123456789abcdef",
        "not-an-id",
        "0123456789ABCDEF0123456789ABCDEF",
        "x" * 100,
    ],
)
async def test_unknown_request_is_404(rejecting_api: Api, request_id: str) -> None:
    reply = await rejecting_api.call("GET", f"/v1/requests/{request_id}")
    assert_problem(
        reply, 404, "request-not-found", "Not Found", f"no request with id {request_id[:64]!r}"
    )


async def test_reading_a_request_needs_mailbox_read(api: Api) -> None:
    created = await api.post()
    reply = await api.call(
        "GET",
        created.headers["Location"],
        authorization=f"Bearer {api.token('mailbox:create')}",
    )
    assert_problem(
        reply, 403, "insufficient-scope", "Forbidden", "the token lacks the scope 'mailbox:read'"
    )
    assert (
        reply.headers["WWW-Authenticate"]
        == f'{REALM}, error="insufficient_scope", scope="mailbox:read"'
    )
    anonymous = await api.call("GET", created.headers["Location"], authorization=None)
    assert anonymous.status == 401
    reader = await api.call(
        "GET", created.headers["Location"], authorization=f"Bearer {api.token('mailbox:read')}"
    )
    assert reader.status == 200
    assert reader.body == {
        "request_id": created.body["request_id"],
        "operation": "create-mailbox",
        "status": "accepted",
        "created_at": reader.body["created_at"],
        "updated_at": reader.body["updated_at"],
        "targets": {},
        "identity_id": api.idm.identities["jane.doe"],
    }


# --- routing errors ----------------------------------------------------------------------------


async def test_unknown_route_is_a_404_problem(rejecting_api: Api) -> None:
    reply = await rejecting_api.call("GET", "/v2/nothing-here", authorization=None)
    assert_problem(reply, 404, "not-found", "Not Found", "404: Not Found")


async def test_wrong_method_is_a_405_problem_with_allow(rejecting_api: Api) -> None:
    reply = await rejecting_api.call("PUT", "/v1/mailboxes", data=b"{}")
    assert_problem(
        reply, 405, "method-not-allowed", "Method Not Allowed", "405: Method Not Allowed"
    )
    assert reply.headers["Allow"] == "POST"


async def test_a_caller_cannot_read_another_callers_request(api: Api) -> None:
    status, headers, _ = await api.post()
    assert status == 202
    location = f"{api.url}{headers['Location']}"
    other = api.token("mailbox:read", sub="someone-else")
    async with api.http.get(location, headers={"Authorization": f"Bearer {other}"}) as response:
        assert response.status == 404
    admin = api.token("mailbox:read mailbox:admin", sub="operator")
    async with api.http.get(location, headers={"Authorization": f"Bearer {admin}"}) as response:
        assert response.status == 200
