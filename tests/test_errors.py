"""The one error table (service/errors.py): every row pinned, and what the adapters do with it.

Every AWS row is checked on a ``ClientError`` that botocore itself parsed from an HTTP error
answer (a stub server speaking each service's protocol), every HTTP row on a real
``aiohttp.ClientResponseError``. The behavioural tests run the adapters against real servers
(moto through the session fixtures, aiohttp stubs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from aiohttp import web
from botocore.exceptions import ClientError

from courier_testkit.ports import serving
from service.api.problems import RETRY_AFTER_SECONDS
from service.aws import AwsClients
from service.bootstrap import Resources
from service.dynamo import DynamoDB, open_dynamodb
from service.envelope import Envelope, EnvelopeCipher
from service.errors import (
    AWS_CODES,
    HTTP_STATUSES,
    MISCONFIGURED,
    REFUSE,
    RETRY,
    CourierError,
    Decision,
    EnvelopeError,
    PermanentError,
    TargetHttpError,
    TransientError,
    classify,
    classify_aws,
    classify_http,
    is_retryable,
)
from service.idm import IdmClient, IdmError
from service.queue import Producer, SendError
from service.secrets.credstash import CredStash
from service.secrets.errors import SecretError, SecretMisconfiguredError, SecretUnavailableError
from service.settings import AwsSettings, EnvelopeSettings, IdmSettings, Settings, WorkerSettings
from service.sqs import LeanSqs, open_lean_sqs
from service.status import RequestState, StatusRefusedError, StatusStore, StatusUnavailableError
from service.stubs import IdmStub
from service.worker.outcomes import DeadLetter, Message, Retry
from service.worker.pipeline import Pipeline
from tests.test_api import assert_problem, running_api

# What each decision leads to, for the worker and the API, is the table in service/errors.py's
# docstring; the behavioural tests below show it on real servers (an IdM 408 retried, a
# missing queue answered 503, a refused status write answered 500, an envelope KMS refuses
# dead-lettered). The rows here pin the decision itself.
# (source, code) -> decision. Every row of AWS_CODES, and nothing else.
AWS_ROWS: dict[tuple[str, str], Decision] = {
    ("any", "Throttling"): RETRY,
    ("any", "ThrottlingException"): RETRY,
    ("any", "ThrottledException"): RETRY,
    ("any", "RequestThrottled"): RETRY,
    ("any", "RequestThrottledException"): RETRY,
    ("any", "TooManyRequestsException"): RETRY,
    ("any", "RequestLimitExceeded"): RETRY,
    ("any", "InternalError"): RETRY,
    ("any", "InternalFailure"): RETRY,
    ("any", "InternalServerError"): RETRY,
    ("any", "ServiceUnavailable"): RETRY,
    ("any", "ServiceUnavailableException"): RETRY,
    ("any", "RequestTimeout"): RETRY,
    ("any", "RequestTimeoutException"): RETRY,
    ("any", "ExpiredToken"): RETRY,
    ("any", "ExpiredTokenException"): RETRY,
    ("any", "AccessDenied"): MISCONFIGURED,
    ("any", "AccessDeniedException"): MISCONFIGURED,
    ("any", "UnrecognizedClientException"): MISCONFIGURED,
    ("any", "InvalidClientTokenId"): MISCONFIGURED,
    ("any", "SignatureDoesNotMatch"): MISCONFIGURED,
    ("any", "InvalidSignatureException"): MISCONFIGURED,
    ("any", "IncompleteSignature"): MISCONFIGURED,
    ("any", "RequestExpired"): MISCONFIGURED,
    ("any", "ValidationException"): REFUSE,
    ("any", "SerializationException"): REFUSE,
    ("any", "MissingParameter"): REFUSE,
    ("any", "InvalidParameterValue"): REFUSE,
    ("any", "InvalidParameterCombination"): REFUSE,
    ("sqs", "AWS.SimpleQueueService.ServiceUnavailable"): RETRY,
    ("sqs", "KmsThrottled"): RETRY,
    ("sqs", "KMS.ThrottlingException"): RETRY,
    ("sqs", "OverLimit"): RETRY,
    ("sqs", "QueueDoesNotExist"): MISCONFIGURED,
    ("sqs", "AWS.SimpleQueueService.NonExistentQueue"): MISCONFIGURED,
    ("sqs", "AWS.SimpleQueueService.QueueDeletedRecently"): MISCONFIGURED,
    ("sqs", "KmsAccessDenied"): MISCONFIGURED,
    ("sqs", "KMS.AccessDeniedException"): MISCONFIGURED,
    ("sqs", "KmsDisabled"): MISCONFIGURED,
    ("sqs", "KMS.DisabledException"): MISCONFIGURED,
    ("sqs", "KmsNotFound"): MISCONFIGURED,
    ("sqs", "KMS.NotFoundException"): MISCONFIGURED,
    ("sqs", "KmsInvalidState"): MISCONFIGURED,
    ("sqs", "KMS.InvalidStateException"): MISCONFIGURED,
    ("sqs", "KmsInvalidKeyUsage"): MISCONFIGURED,
    ("sqs", "KMS.InvalidKeyUsageException"): MISCONFIGURED,
    ("sqs", "KmsOptInRequired"): MISCONFIGURED,
    ("sqs", "KMS.OptInRequired"): MISCONFIGURED,
    ("sqs", "InvalidMessageContents"): REFUSE,
    ("sqs", "InvalidAttributeValue"): REFUSE,
    ("sqs", "ReceiptHandleIsInvalid"): REFUSE,
    ("sqs", "AWS.SimpleQueueService.BatchEntryIdsNotDistinct"): REFUSE,
    ("sqs", "AWS.SimpleQueueService.TooManyEntriesInBatchRequest"): REFUSE,
    ("sqs", "AWS.SimpleQueueService.BatchRequestTooLong"): REFUSE,
    ("dynamodb", "ProvisionedThroughputExceededException"): RETRY,
    ("dynamodb", "TransactionInProgressException"): RETRY,
    ("dynamodb", "TransactionConflictException"): RETRY,
    ("dynamodb", "LimitExceededException"): RETRY,
    ("dynamodb", "ResourceNotFoundException"): MISCONFIGURED,
    ("dynamodb", "ConditionalCheckFailedException"): REFUSE,
    ("dynamodb", "ItemCollectionSizeLimitExceededException"): REFUSE,
    ("kms", "KMSInternalException"): RETRY,
    ("kms", "DependencyTimeoutException"): RETRY,
    ("kms", "KeyUnavailableException"): RETRY,
    ("kms", "LimitExceededException"): MISCONFIGURED,
    ("kms", "DisabledException"): MISCONFIGURED,
    ("kms", "KMSInvalidStateException"): MISCONFIGURED,
    ("kms", "NotFoundException"): MISCONFIGURED,
    ("kms", "InvalidKeyUsageException"): MISCONFIGURED,
    ("kms", "ValidationException"): MISCONFIGURED,
    ("kms", "InvalidCiphertextException"): REFUSE,
    ("kms", "IncorrectKeyException"): REFUSE,
}

# Codes no table names fall back on the HTTP status.
FALLBACK_ROWS = [
    (500, RETRY),
    (502, RETRY),
    (503, RETRY),
    (504, RETRY),
    (429, RETRY),
    (403, MISCONFIGURED),
    (400, REFUSE),
    (404, REFUSE),
]

# status -> decision: the IdM's and the targets' answers.
HTTP_ROWS: dict[int, Decision] = {
    400: REFUSE,
    401: REFUSE,
    403: REFUSE,
    404: REFUSE,
    408: RETRY,
    409: REFUSE,
    410: REFUSE,
    413: REFUSE,
    422: REFUSE,
    425: RETRY,
    429: RETRY,
    500: RETRY,
    501: RETRY,
    502: RETRY,
    503: RETRY,
    504: RETRY,
}

# The AWS protocol of each source, as botocore parses its errors.
_PROTOCOL_SERVICE = {"any": "dynamodb", "sqs": "sqs", "dynamodb": "dynamodb", "kms": "kms"}


class StubAws:
    """An HTTP server answering every AWS request with one error, in the JSON protocols.

    SQS speaks JSON with query compatibility: the legacy code travels in ``x-amzn-query-error``,
    and botocore reports that one (``AWS.SimpleQueueService.NonExistentQueue``), as for AWS.
    """

    def __init__(self) -> None:
        self.status = 400
        self.code = "ValidationException"
        self.legacy_code = ""  # SQS's query-protocol code, when it differs from the JSON one

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        headers = {}
        if "AmazonSQS" in request.headers.get("X-Amz-Target", ""):
            fault = "Sender" if self.status < 500 else "Receiver"
            headers["x-amzn-query-error"] = f"{self.legacy_code or self.code};{fault}"
        body = json.dumps({"__type": f"com.amazonaws.stub#{self.code}", "message": "stub says no"})
        return web.Response(
            status=self.status,
            text=body,
            content_type="application/x-amz-json-1.0",
            headers=headers,
        )


@pytest.fixture(scope="module")
async def stub_aws() -> AsyncIterator[tuple[StubAws, dict[str, Any]]]:
    """The stub and one botocore client per service pointed at it, without retries."""
    stub = StubAws()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", stub.handle)
    config = AioConfig(retries={"mode": "standard", "total_max_attempts": 1})
    session = get_session()
    async with serving(app) as url, contextlib.AsyncExitStack() as stack:
        clients: dict[str, Any] = {}
        for service in ("sqs", "dynamodb", "kms"):
            clients[service] = await stack.enter_async_context(
                session.create_client(
                    service,
                    region_name="us-east-1",
                    endpoint_url=url,
                    aws_access_key_id="testing",
                    aws_secret_access_key="testing",
                    config=config,
                )
            )
        yield stub, clients


async def aws_error(
    stub_aws: tuple[StubAws, dict[str, Any]], service: str, status: int, code: str
) -> ClientError:
    """The ClientError botocore raises when ``service`` answers ``status`` with ``code``."""
    stub, clients = stub_aws
    stub.status, stub.code = status, code
    calls = {
        "sqs": lambda: clients["sqs"].send_message(QueueUrl="http://q/1/work", MessageBody="m"),
        "dynamodb": lambda: clients["dynamodb"].get_item(TableName="t", Key={"pk": {"S": "k"}}),
        "kms": lambda: clients["kms"].decrypt(CiphertextBlob=b"ciphertext"),
    }
    with pytest.raises(ClientError) as caught:
        await calls[service]()
    return caught.value


@pytest.fixture(scope="module")
async def hot_dynamodb(
    stub_aws: tuple[StubAws, dict[str, Any]], monkeypatch_module: pytest.MonkeyPatch
) -> AsyncIterator[DynamoDB]:
    """The hot path's DynamoDB client (aiodynamo) pointed at the same stub."""
    endpoint = str(stub_aws[1]["dynamodb"].meta.endpoint_url)
    monkeypatch_module.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch_module.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    async with open_dynamodb(AwsSettings(endpoint_url=endpoint)) as client:
        yield client


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


async def hot_error(
    stub_aws: tuple[StubAws, dict[str, Any]], client: DynamoDB, status: int, code: str
) -> ClientError:
    """The ClientError the hot path's client raises for the same answer."""
    stub_aws[0].status, stub_aws[0].code = status, code
    with pytest.raises(ClientError) as caught:
        await client.get_item(TableName="t", Key={"pk": {"S": "k"}})
    return caught.value


def test_every_row_of_the_aws_table_is_pinned() -> None:
    table = {(source, code) for source, codes in AWS_CODES.items() for code in codes}
    assert table == set(AWS_ROWS)


def test_every_row_of_the_http_table_is_pinned() -> None:
    assert set(HTTP_STATUSES) <= set(HTTP_ROWS)


@pytest.mark.parametrize(("source", "code"), sorted(AWS_ROWS))
async def test_aws_row(stub_aws: tuple[StubAws, dict[str, Any]], source: str, code: str) -> None:
    decision = AWS_ROWS[(source, code)]
    # A 400, as AWS answers most of these: the code, not the status, decides.
    exc = await aws_error(stub_aws, _PROTOCOL_SERVICE[source], 400, code)
    assert exc.response["Error"]["Code"] == code

    assert classify_aws(exc, source) is decision
    assert classify(exc, source) is decision
    if source == "any":  # a row every service shares holds whatever the service
        for service in ("sqs", "dynamodb", "kms"):
            own = AWS_CODES[service].get(code, decision)
            assert classify_aws(exc, service) is own


@pytest.mark.parametrize(
    "code", sorted({c for (source, c) in AWS_ROWS if source in ("any", "dynamodb")})
)
async def test_the_hot_dynamodb_client_raises_what_botocore_raises(
    stub_aws: tuple[StubAws, dict[str, Any]], hot_dynamodb: DynamoDB, code: str
) -> None:
    botocore_error = await aws_error(stub_aws, "dynamodb", 400, code)
    hot = await hot_error(stub_aws, hot_dynamodb, 400, code)
    assert hot.response["Error"]["Code"] == botocore_error.response["Error"]["Code"] == code
    assert classify(hot, "dynamodb") is classify(botocore_error, "dynamodb")


@pytest.mark.parametrize(("status", "decision"), FALLBACK_ROWS)
async def test_aws_code_no_table_names_goes_by_status(
    stub_aws: tuple[StubAws, dict[str, Any]], status: int, decision: Decision
) -> None:
    for service in ("sqs", "dynamodb", "kms"):
        exc = await aws_error(stub_aws, service, status, "SomethingNewException")
        assert classify_aws(exc, service) is decision
        assert is_retryable(exc) is decision.retryable


@pytest.fixture(scope="module")
async def hot_sqs(
    stub_aws: tuple[StubAws, dict[str, Any]], monkeypatch_module: pytest.MonkeyPatch
) -> AsyncIterator[LeanSqs]:
    """The hot path's SQS client pointed at the same stub."""
    monkeypatch_module.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch_module.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    endpoint = str(stub_aws[1]["sqs"].meta.endpoint_url)
    async with open_lean_sqs(AwsSettings(endpoint_url=endpoint), endpoint) as client:
        yield client


@pytest.mark.parametrize(
    "code", sorted({c for (source, c) in AWS_ROWS if source in ("any", "sqs")})
)
async def test_the_hot_sqs_client_raises_what_botocore_raises(
    stub_aws: tuple[StubAws, dict[str, Any]], hot_sqs: LeanSqs, code: str
) -> None:
    botocore_error = await aws_error(stub_aws, "sqs", 400, code)
    with pytest.raises(ClientError) as caught:
        await hot_sqs.send_message(QueueUrl="http://q/1/work", MessageBody="m")
    hot = caught.value
    assert hot.response["Error"]["Code"] == botocore_error.response["Error"]["Code"]
    assert classify(hot, "sqs") is classify(botocore_error, "sqs")


async def test_the_hot_sqs_client_reads_the_legacy_code_as_botocore_does(
    stub_aws: tuple[StubAws, dict[str, Any]], hot_sqs: LeanSqs
) -> None:
    stub_aws[0].legacy_code = "AWS.SimpleQueueService.NonExistentQueue"
    try:
        botocore_error = await aws_error(stub_aws, "sqs", 400, "QueueDoesNotExist")
        with pytest.raises(ClientError) as caught:
            await hot_sqs.send_message(QueueUrl="http://q/1/work", MessageBody="m")
    finally:
        stub_aws[0].legacy_code = ""
    for error in (caught.value, botocore_error):
        assert error.response["Error"]["Code"] == "AWS.SimpleQueueService.NonExistentQueue"
        assert error.response["Error"]["QueryErrorCode"] == "QueueDoesNotExist"
        assert classify(error, "sqs") is MISCONFIGURED


@pytest.mark.parametrize(("status", "decision"), FALLBACK_ROWS)
async def test_the_hot_sqs_client_falls_back_on_the_status_too(
    stub_aws: tuple[StubAws, dict[str, Any]], hot_sqs: LeanSqs, status: int, decision: Decision
) -> None:
    stub_aws[0].status, stub_aws[0].code = status, "SomethingNewException"
    with pytest.raises(ClientError) as caught:
        await hot_sqs.delete_message_batch(QueueUrl="http://q/1/work", Entries=[])
    assert classify(caught.value, "sqs") is decision


@pytest.mark.parametrize(("status", "decision"), FALLBACK_ROWS)
async def test_the_hot_dynamodb_client_falls_back_on_the_status_too(
    stub_aws: tuple[StubAws, dict[str, Any]],
    hot_dynamodb: DynamoDB,
    status: int,
    decision: Decision,
) -> None:
    exc = await hot_error(stub_aws, hot_dynamodb, status, "SomethingNewException")
    assert classify(exc, "dynamodb") is decision


@pytest.fixture(scope="module")
async def http_stub() -> AsyncIterator[str]:
    """An HTTP server answering ``/<status>`` with that status."""

    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["status"]))

    app = web.Application()
    app.router.add_get("/{status}", answer)
    async with serving(app) as url:
        yield url


@pytest.mark.parametrize("status", sorted(HTTP_ROWS))
async def test_http_row(http_stub: str, status: int) -> None:
    decision = HTTP_ROWS[status]
    async with aiohttp.ClientSession(raise_for_status=True) as session:
        with pytest.raises(aiohttp.ClientResponseError) as caught:
            await session.get(f"{http_stub}/{status}")
    assert caught.value.status == status

    assert classify_http(status) is decision
    assert classify(caught.value) is decision
    assert classify(TargetHttpError("crm", status)) is decision


async def test_network_failures_retry(http_stub: str) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError) as caught:
            await session.get("http://127.0.0.1:1/")
    assert classify(caught.value) is RETRY
    assert classify(TimeoutError()) is RETRY


def test_errors_nobody_classified_are_not_retried() -> None:
    assert classify(RuntimeError("a bug")) is REFUSE
    assert not is_retryable(KeyError("a bug"))


# --- IdM: the HTTP table, not its own list ---------------------------------------------------


@pytest.fixture
async def idm() -> AsyncIterator[tuple[IdmStub, IdmClient]]:
    stub = IdmStub()
    async with stub.serving() as url, aiohttp.ClientSession() as session:

        async def api_key() -> str:
            return ""

        settings = IdmSettings(url=url, timeout_seconds=2.0, retries=2)
        yield stub, IdmClient(session, settings, api_key)


@pytest.mark.parametrize("status", [408, 425])
async def test_idm_408_and_425_are_retried_then_unavailable(
    idm: tuple[IdmStub, IdmClient], status: int
) -> None:
    # Changed: idm.py called these "rejected" (no retry, 502 without Retry-After) while
    # errors.py called them retryable.
    stub, client = idm
    stub.behaviour.fixed_status = status
    with pytest.raises(IdmError) as caught:
        await client.create_identity("req-1", {"username": "jane.doe"})
    assert caught.value.kind == "unavailable"
    assert caught.value.retryable
    assert is_retryable(caught.value)
    assert len(stub.calls) == 3  # 1 + idm.retries, all under one Idempotency-Key
    assert {call.idempotency_key for call in stub.calls} == {"req-1"}


@pytest.mark.parametrize(
    ("status", "kind"), [(409, "conflict"), (400, "rejected"), (401, "rejected")]
)
async def test_idm_refusals_are_not_retried(
    idm: tuple[IdmStub, IdmClient], status: int, kind: str
) -> None:
    stub, client = idm
    stub.behaviour.fixed_status = status
    with pytest.raises(IdmError) as caught:
        await client.create_identity("req-1", {"username": "jane.doe"})
    assert caught.value.kind == kind
    assert not caught.value.retryable
    assert not is_retryable(caught.value)
    assert len(stub.calls) == 1


async def test_idm_5xx_is_retried_and_recovers(idm: tuple[IdmStub, IdmClient]) -> None:
    stub, client = idm
    stub.behaviour.fixed_status = 503
    with pytest.raises(IdmError) as caught:
        await client.create_identity("req-1", {"username": "jane.doe"})
    assert caught.value.kind == "unavailable"
    assert len(stub.calls) == 3


# --- Status table: a refusal is not an outage --------------------------------------------------


async def test_status_table_refusing_a_write_is_not_transient(
    aws: AwsClients, fresh: Resources
) -> None:
    # Changed: every ClientError was a StatusUnavailableError (API 503, as if DynamoDB were down).
    # DynamoDB refuses an item over 400 KB with ValidationException: courier's bug, never going
    # away by retrying; the API answers 500 and the worker's poller logs handler_error.
    store = StatusStore(aws.dynamodb, fresh.status_table, ttl_days=1)
    with pytest.raises(StatusRefusedError) as caught:
        await store.update("a" * 32, state=RequestState.PROCESSING, error="x" * 500_000)
    assert not isinstance(caught.value, TransientError)
    assert isinstance(caught.value, PermanentError)
    assert not is_retryable(caught.value)
    assert "ValidationException" in str(caught.value)


async def test_status_table_that_does_not_exist_is_a_misconfiguration(aws: AwsClients) -> None:
    store = StatusStore(aws.dynamodb, "no-such-status-table", ttl_days=1)
    with pytest.raises(StatusUnavailableError) as caught:
        await store.get("a" * 32)
    assert caught.value.decision is MISCONFIGURED
    assert is_retryable(caught.value)  # 503 / backoff until an operator creates it


# --- SQS send: courier's deployment is 503 like KMS and DynamoDB, not 500 ------------------------


@pytest.mark.parametrize("batching", [False, True])
async def test_sending_to_a_queue_that_does_not_exist_is_unavailable_not_refused(
    aws: AwsClients, fresh: Resources, batching: bool
) -> None:
    # Changed: a PermanentError (the API answered 500) while a missing status table or a KMS
    # AccessDenied was 503. Not the client's request: 503 + Retry-After until it is fixed.
    missing = fresh.queue_url.rsplit("/", 1)[0] + "/no-such-queue"
    producer = Producer(aws.sqs, missing, batching=batching)
    try:
        with pytest.raises(SendError) as caught:
            await producer.send("body", {"op": "create-mailbox"})
    finally:
        await producer.aclose()
    assert caught.value.decision is MISCONFIGURED
    assert is_retryable(caught.value)


# --- What a client of the API sees ---------------------------------------------------------------


async def test_api_answers_idm_408_with_retries_then_502_and_retry_after(
    settings: Settings, fresh: Resources, aws: AwsClients
) -> None:
    # Changed: one IdM call and 502 without Retry-After, as for a request the IdM refused.
    async with running_api(settings, fresh, aws) as api:
        api.idm.behaviour.fixed_status = 408
        reply = await api.post()
        assert_problem(
            reply,
            502,
            "idm-failed",
            "Bad Gateway",
            "the identity back-end failed: the IdM answered 408",
        )
        assert reply.headers["Retry-After"] == RETRY_AFTER_SECONDS
        assert len(api.idm.calls) == 1 + api.settings.idm.retries


async def test_api_answers_an_idm_refusal_with_502_and_no_retry_after(
    settings: Settings, fresh: Resources, aws: AwsClients
) -> None:
    async with running_api(settings, fresh, aws) as api:
        api.idm.behaviour.fixed_status = 422
        reply = await api.post()
        assert_problem(
            reply,
            502,
            "idm-failed",
            "Bad Gateway",
            "the identity back-end failed: the IdM rejected the identity (422)",
        )
        assert "Retry-After" not in reply.headers
        assert len(api.idm.calls) == 1


async def test_api_answers_503_when_its_queue_does_not_exist(
    settings: Settings, fresh: Resources, aws: AwsClients, caplog: pytest.LogCaptureFixture
) -> None:
    # Changed: 500 internal-error, while a missing table or a KMS AccessDenied was 503.
    missing = fresh.queue_url.rsplit("/", 1)[0] + "/no-such-queue"
    broken = settings.replace(queue=dataclasses.replace(settings.queue, url=missing))
    async with running_api(broken, fresh, aws) as api:
        reply = await api.post(headers={"Idempotency-Key": "k-1"})
        assert_problem(
            reply,
            503,
            "service-unavailable",
            "Service Unavailable",
            "a service courier depends on is unavailable; retry later",
        )
        assert reply.headers["Retry-After"] == RETRY_AFTER_SECONDS
        (record,) = await api.status_records()
        assert record["state"]["S"] == "send_failed"  # a retry with the key is a fresh attempt
    # The operator's log says it is a deployment fault, not an outage that will pass.
    [logged] = [
        r
        for r in caplog.records
        if getattr(r, "fields", {}).get("event") == "dependency_unavailable"
    ]
    assert logged.fields["decision"] == "misconfigured"  # type: ignore[attr-defined]


# --- CredStash: the store's refusals, by the table ---------------------------------------------


async def test_a_secret_table_that_does_not_exist_is_a_misconfiguration(aws: AwsClients) -> None:
    # Changed: a plain SecretError (neither transient nor permanent; the API answered 500).
    store = CredStash(aws.dynamodb, aws.kms, "no-such-credential-store")
    with pytest.raises(SecretError) as caught:
        await store.get("courier.crm.token")
    assert isinstance(caught.value, SecretMisconfiguredError)
    assert not isinstance(caught.value, SecretUnavailableError)  # not an outage: no stale value
    assert classify(caught.value) is MISCONFIGURED
    assert isinstance(caught.value, TransientError)  # 503 + Retry-After in the API


@pytest.mark.parametrize(
    ("code", "status", "error"),
    [
        ("AccessDeniedException", 400, SecretMisconfiguredError),  # LeadingKeys condition
        ("ProvisionedThroughputExceededException", 400, SecretUnavailableError),
        ("InternalServerError", 500, SecretUnavailableError),
        ("ValidationException", 400, SecretError),
    ],
)
async def test_secret_store_errors_follow_the_dynamodb_row(
    stub_aws: tuple[StubAws, dict[str, Any]], code: str, status: int, error: type[SecretError]
) -> None:
    stub, clients = stub_aws
    stub.status, stub.code = status, code
    store = CredStash(clients["dynamodb"], clients["kms"])
    with pytest.raises(SecretError) as caught:
        await store.get("courier.crm.token")
    assert type(caught.value) is error
    assert code in str(caught.value)


async def test_receiving_from_a_queue_that_does_not_exist_backs_off_like_an_outage(
    aws: AwsClients, fresh: Resources
) -> None:
    # Changed: not retryable, so the poller slept its longest backoff (30 s) from the first
    # failure; now it backs off exponentially up to it, as for any outage.
    missing = fresh.queue_url.rsplit("/", 1)[0] + "/no-such-queue"
    with pytest.raises(ClientError) as caught:
        await aws.sqs.receive_message(QueueUrl=missing, WaitTimeSeconds=0)
    assert classify(caught.value) is MISCONFIGURED  # the code alone names the source
    assert is_retryable(caught.value)


# --- Envelope: only a refusal the KMS row names is the message's fault --------------------------

KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555"


@pytest.mark.parametrize(
    ("code", "decision"),
    [
        ("InvalidCiphertextException", REFUSE),  # dead-lettered as undecryptable
        ("IncorrectKeyException", REFUSE),
        ("AccessDeniedException", MISCONFIGURED),  # courier's role: retried
        ("KMSInvalidStateException", MISCONFIGURED),
        ("ThrottlingException", RETRY),
        # No row names it: no proof against the message, so retried, as courier's own side.
        ("SomethingNewException", MISCONFIGURED),
    ],
)
async def test_opening_an_envelope_follows_the_kms_row(
    stub_aws: tuple[StubAws, dict[str, Any]],
    code: str,
    decision: Decision,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stub, clients = stub_aws
    stub.status, stub.code = 400, code
    cipher = EnvelopeCipher(clients["kms"], EnvelopeSettings(kms_key_id=KEY_ARN))
    body = Envelope("create-mailbox", "req-1", KEY_ARN, b"ek", b"n" * 12, b"c" * 32).serialize()
    with pytest.raises(CourierError) as caught:
        await cipher.open(body)
    if decision is REFUSE:
        assert isinstance(caught.value, EnvelopeError)
        assert caught.value.reason == "undecryptable"
    else:
        assert isinstance(caught.value, TransientError)
        assert classify(caught.value) is decision

    # The worker: dead-lettered, or retried with a log line that says which kind of failure.
    status = StatusStore(clients["dynamodb"], "never-reached", 1)
    pipeline = Pipeline(cipher, status, [], WorkerSettings())
    message = Message("m-1", "r-1", body, {"op": "create-mailbox"}, 1, time.time())
    with caplog.at_level(logging.INFO, logger="courier.pipeline"):
        outcome = await pipeline.handle(message)
    if decision is REFUSE:
        assert isinstance(outcome, DeadLetter)
        assert outcome.reason == "undecryptable"
        return
    assert isinstance(outcome, Retry)
    [logged] = [
        r for r in caplog.records if getattr(r, "fields", {}).get("event") == "message_retry"
    ]
    assert logged.fields["decision"] == decision.value  # type: ignore[attr-defined]
    assert logged.levelno == (logging.WARNING if decision is MISCONFIGURED else logging.INFO)
