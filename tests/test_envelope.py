"""Envelope encryption against KMS in moto over HTTP: format, key reuse, caching, every failure."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import json
import os
import socket
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from types import MappingProxyType
from typing import Any

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from aiohttp import web
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from prometheus_client import REGISTRY

from courier_testkit.ports import serving
from service.aws import AwsClients, client_config
from service.bootstrap import Resources
from service.envelope import ENVELOPE_VERSION, Envelope, EnvelopeCipher, OpenedEnvelope
from service.errors import EnvelopeError, TransientError, is_retryable
from service.local import use_fake_credentials
from service.settings import AwsSettings, EnvelopeSettings

PAYLOAD = {"msisdn": "+4512345678", "mailbox": {"quota_mb": 512, "name": "Åse Ødegård"}}
SECRET = "secret-marker-4711"
# Part of the wire contract: every KMS call for envelope data keys carries this context.
ENCRYPTION_CONTEXT = {"purpose": "courier-envelope"}
_ids = itertools.count()


# --- helpers -------------------------------------------------------------------------------


def kms_calls(operation: str | None = None) -> float:
    """KMS requests sent so far by courier's clients (one operation, or all of them)."""
    total = 0.0
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            labels = sample.labels
            if (
                sample.name == "courier_aws_requests_total"
                and labels.get("service") == "kms"
                and operation in (None, labels.get("operation"))
            ):
                total += sample.value
    return total


class KmsCalls:
    """KMS requests sent since this object was made."""

    def __init__(self) -> None:
        self._start = {op: kms_calls(op) for op in ("GenerateDataKey", "Decrypt")}
        self._start_total = kms_calls()

    def __getitem__(self, operation: str) -> int:
        return int(kms_calls(operation) - self._start[operation])

    @property
    def total(self) -> int:
        return int(kms_calls() - self._start_total)


def data_key_events(event: str) -> float:
    value = REGISTRY.get_sample_value("courier_envelope_data_keys_total", {"event": event})
    return value or 0.0


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def new_id() -> str:
    return f"req-{os.getpid()}-{next(_ids)}"


def edit(body: str, change: Callable[[dict[str, Any]], None]) -> str:
    document = json.loads(body)
    change(document)
    return json.dumps(document)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def flip_bit(text: str, index: int) -> str:
    data = bytearray(unb64(text))
    data[index] ^= 0x01
    return b64(bytes(data))


async def forge(
    kms: Any,
    key_id: str,
    plaintext: bytes,
    *,
    context: dict[str, str] | None = None,
    op: str = "create-mailbox",
) -> str:
    """An envelope made by hand: a fresh data key from KMS, ``plaintext`` as the payload bytes."""
    response = await kms.generate_data_key(
        KeyId=key_id, KeySpec="AES_256", EncryptionContext=context or dict(ENCRYPTION_CONTEXT)
    )
    unsealed = Envelope(
        op, new_id(), response["KeyId"], response["CiphertextBlob"], os.urandom(12), b""
    )
    ciphertext = AESGCM(response["Plaintext"]).encrypt(unsealed.nonce, plaintext, unsealed.aad)
    return dataclasses.replace(unsealed, ciphertext=ciphertext).serialize()


async def open_error(cipher: EnvelopeCipher, body: str | bytes) -> EnvelopeError:
    with pytest.raises(EnvelopeError) as caught:
        await cipher.open(body)
    assert not is_retryable(caught.value)
    return caught.value


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def make_cipher(aws: AwsClients, resources: Resources) -> Callable[..., EnvelopeCipher]:
    """A new cipher (one per simulated process) over the session's KMS key."""

    def make(clock: Callable[[], float] | None = None, **overrides: Any) -> EnvelopeCipher:
        settings = EnvelopeSettings(**{"kms_key_id": resources.data_key_arn, **overrides})
        if clock is None:
            return EnvelopeCipher(aws.kms, settings)
        return EnvelopeCipher(aws.kms, settings, clock=clock)

    return make


@pytest.fixture
def cipher(make_cipher: Callable[..., EnvelopeCipher]) -> EnvelopeCipher:
    return make_cipher()


@pytest.fixture(scope="module")
async def other_key(aws: AwsClients) -> str:
    """A second KMS key, which courier does not use."""
    created = await aws.kms.create_key(Description="not courier's envelope key")
    return str(created["KeyMetadata"]["Arn"])


@pytest.fixture(scope="module")
async def data_key_alias(aws: AwsClients, resources: Resources) -> str:
    """An alias of the envelope key, as operators usually configure it."""
    alias = f"alias/envelope-test-{os.getpid()}"
    await aws.kms.create_alias(AliasName=alias, TargetKeyId=resources.data_key_arn)
    return alias


@pytest.fixture
async def sealed(cipher: EnvelopeCipher) -> str:
    """One envelope sealed by ``cipher``."""
    return await cipher.seal("create-mailbox", new_id(), PAYLOAD)


# --- format and round trip -----------------------------------------------------------------


async def test_round_trip(cipher: EnvelopeCipher) -> None:
    message_id = new_id()
    body = await cipher.seal("create-mailbox", message_id, PAYLOAD)

    opened = await cipher.open(body)

    assert opened == OpenedEnvelope("create-mailbox", message_id, PAYLOAD)
    assert (await cipher.open(body.encode())).payload == PAYLOAD


async def test_round_trip_of_unusual_header_and_mapping_payload(cipher: EnvelopeCipher) -> None:
    op, message_id = 'op "quoted" ÿ', "id/with\\backslash\u2028and-ünïcode"
    body = await cipher.seal(op, message_id, MappingProxyType({"a": [1, 2.5, None, True]}))

    opened = await cipher.open(body)

    assert (opened.op, opened.id, opened.payload) == (op, message_id, {"a": [1, 2.5, None, True]})


async def test_header_is_readable_without_decrypting(
    cipher: EnvelopeCipher, resources: Resources
) -> None:
    message_id = new_id()
    body = await cipher.seal("create-mailbox", message_id, {"name": SECRET})
    calls = KmsCalls()

    envelope = Envelope.parse(body)

    assert calls.total == 0
    assert (envelope.version, envelope.op, envelope.id) == (1, "create-mailbox", message_id)
    assert envelope.key_id == resources.data_key_arn
    assert len(envelope.nonce) == 12
    assert envelope.serialize() == body
    document = json.loads(body)
    assert list(document) == ["v", "op", "id", "key", "iv", "ct"]
    assert list(document["key"]) == ["kms", "ek"]
    assert SECRET not in body


@pytest.mark.parametrize(
    ("op", "message_id"),
    [("create-mailbox", "r-1"), ("ø", 'a "quoted" \\ id'), ("\u2028", "\x00\n\ud800")],
)
def test_associated_data_is_the_header_as_compact_ascii_json(op: str, message_id: str) -> None:
    envelope = Envelope(op, message_id, "arn", b"k", b"n" * 12, b"c" * 16)

    expected = json.dumps([ENVELOPE_VERSION, op, message_id], separators=(",", ":"))
    assert envelope.aad == expected.encode("ascii")


async def test_every_message_gets_its_own_nonce(cipher: EnvelopeCipher) -> None:
    bodies = [await cipher.seal("create-mailbox", "same-id", PAYLOAD) for _ in range(500)]

    nonces = {Envelope.parse(body).nonce for body in bodies}
    ciphertexts = {Envelope.parse(body).ciphertext for body in bodies}

    assert len(nonces) == len(ciphertexts) == 500


async def test_seal_refuses_an_empty_header(cipher: EnvelopeCipher) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        await cipher.seal("", new_id(), PAYLOAD)
    with pytest.raises(ValueError, match="non-empty"):
        await cipher.seal("create-mailbox", "", PAYLOAD)


# --- data key reuse and rotation ----------------------------------------------------------


async def test_data_key_is_reused_for_at_most_max_messages(
    make_cipher: Callable[..., EnvelopeCipher],
) -> None:
    cipher = make_cipher(data_key_max_messages=3)
    calls = KmsCalls()

    bodies = [await cipher.seal("create-mailbox", new_id(), PAYLOAD) for _ in range(7)]

    assert calls["GenerateDataKey"] == 3
    uses = Counter(Envelope.parse(body).encrypted_key for body in bodies)
    assert sorted(uses.values()) == [1, 3, 3]


async def test_data_key_rotates_after_max_age(make_cipher: Callable[..., EnvelopeCipher]) -> None:
    clock = FakeClock()
    cipher = make_cipher(clock, data_key_max_age_seconds=60)
    calls = KmsCalls()

    first = Envelope.parse(await cipher.seal("create-mailbox", new_id(), PAYLOAD))
    clock.now += 59.9
    second = Envelope.parse(await cipher.seal("create-mailbox", new_id(), PAYLOAD))
    clock.now += 0.1
    third = Envelope.parse(await cipher.seal("create-mailbox", new_id(), PAYLOAD))

    assert first.encrypted_key == second.encrypted_key != third.encrypted_key
    assert calls["GenerateDataKey"] == 2


async def test_concurrent_seals_without_a_key_generate_one(cipher: EnvelopeCipher) -> None:
    calls = KmsCalls()
    generated = data_key_events("generated")

    bodies = await asyncio.gather(
        *(cipher.seal("create-mailbox", new_id(), PAYLOAD) for _ in range(100))
    )

    assert calls["GenerateDataKey"] == 1
    assert data_key_events("generated") - generated == 1
    assert len({Envelope.parse(body).encrypted_key for body in bodies}) == 1


async def test_concurrent_seals_never_overuse_a_key(
    make_cipher: Callable[..., EnvelopeCipher],
) -> None:
    cipher = make_cipher(data_key_max_messages=2)
    calls = KmsCalls()

    bodies = await asyncio.gather(
        *(cipher.seal("create-mailbox", new_id(), PAYLOAD) for _ in range(7))
    )

    uses = Counter(Envelope.parse(body).encrypted_key for body in bodies)
    assert sorted(uses.values()) == [1, 2, 2, 2]
    assert calls["GenerateDataKey"] == 4


async def test_ten_thousand_messages_cost_a_handful_of_kms_calls(
    make_cipher: Callable[..., EnvelopeCipher],
) -> None:
    sealer, opener = make_cipher(), make_cipher()
    calls = KmsCalls()
    payloads = [{"n": n, "name": "Åse"} for n in range(10_000)]

    bodies = [await sealer.seal("create-mailbox", f"r-{n}", p) for n, p in enumerate(payloads)]
    opened = [await opener.open(body) for body in bodies]

    assert [o.payload for o in opened] == payloads
    assert calls["GenerateDataKey"] == 1
    assert calls["Decrypt"] == 1
    assert calls.total <= 5


# --- the decrypt cache ----------------------------------------------------------------------


async def test_opening_own_messages_never_calls_decrypt(cipher: EnvelopeCipher) -> None:
    calls = KmsCalls()
    bodies = [await cipher.seal("create-mailbox", new_id(), PAYLOAD) for _ in range(20)]

    for body in bodies:
        await cipher.open(body)

    assert calls["Decrypt"] == 0


async def test_another_process_decrypts_once_per_data_key(
    make_cipher: Callable[..., EnvelopeCipher],
) -> None:
    sealer = make_cipher(data_key_max_messages=5)
    opener = make_cipher()
    bodies = [await sealer.seal("create-mailbox", new_id(), PAYLOAD) for _ in range(20)]
    calls = KmsCalls()
    decrypted, hits = data_key_events("decrypted"), data_key_events("cache_hit")

    for body in bodies + bodies:
        await opener.open(body)

    assert calls["Decrypt"] == 4
    assert data_key_events("decrypted") - decrypted == 4
    assert data_key_events("cache_hit") - hits == 36


async def test_concurrent_opens_of_one_data_key_coalesce(
    make_cipher: Callable[..., EnvelopeCipher],
) -> None:
    sealer, opener = make_cipher(), make_cipher()
    bodies = [await sealer.seal("create-mailbox", new_id(), PAYLOAD) for _ in range(50)]
    calls = KmsCalls()

    opened = await asyncio.gather(*(opener.open(body) for body in bodies))

    assert calls["Decrypt"] == 1
    assert all(o.payload == PAYLOAD for o in opened)


async def test_a_cancelled_opener_does_not_cancel_the_shared_decrypt(
    make_cipher: Callable[..., EnvelopeCipher],
) -> None:
    sealer, opener = make_cipher(), make_cipher()
    first, second = [await sealer.seal("create-mailbox", new_id(), PAYLOAD) for _ in range(2)]
    calls = KmsCalls()

    cancelled = asyncio.create_task(opener.open(first))
    waiting = asyncio.create_task(opener.open(second))
    await asyncio.sleep(0)
    cancelled.cancel()

    assert (await waiting).payload == PAYLOAD
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert (await opener.open(first)).payload == PAYLOAD
    assert calls["Decrypt"] == 1


async def test_cache_size_zero_decrypts_every_message(
    make_cipher: Callable[..., EnvelopeCipher],
) -> None:
    sealer, opener = make_cipher(), make_cipher(decrypt_cache_size=0)
    bodies = [await sealer.seal("create-mailbox", new_id(), PAYLOAD) for _ in range(5)]
    calls = KmsCalls()

    for body in bodies:
        await opener.open(body)

    assert calls["Decrypt"] == 5


async def test_cached_data_keys_expire_after_ttl(
    make_cipher: Callable[..., EnvelopeCipher],
) -> None:
    clock = FakeClock()
    sealer, opener = make_cipher(), make_cipher(clock, decrypt_cache_ttl_seconds=10)
    body = await sealer.seal("create-mailbox", new_id(), PAYLOAD)
    calls = KmsCalls()

    await opener.open(body)
    clock.now += 9.9
    await opener.open(body)
    assert calls["Decrypt"] == 1
    clock.now += 0.1
    await opener.open(body)
    assert calls["Decrypt"] == 2


async def test_cache_evicts_the_least_recently_used_key(
    make_cipher: Callable[..., EnvelopeCipher],
) -> None:
    sealer = make_cipher(data_key_max_messages=1)
    opener = make_cipher(decrypt_cache_size=2)
    a, b, c = [await sealer.seal("create-mailbox", new_id(), PAYLOAD) for _ in range(3)]
    calls = KmsCalls()

    for body in (a, b, a, c, a):  # c evicts b, the least recently used
        await opener.open(body)
    assert calls["Decrypt"] == 3
    await opener.open(b)
    assert calls["Decrypt"] == 4


# --- authentication of header and ciphertext -------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("id", "another-request"), ("op", "delete-mailbox")],
)
async def test_ciphertext_moved_under_another_header_is_tampered(
    cipher: EnvelopeCipher, sealed: str, field: str, value: str
) -> None:
    moved = edit(sealed, lambda d: d.update({field: value}))

    error = await open_error(cipher, moved)

    assert error.reason == "tampered"


async def test_ciphertext_swapped_between_envelopes_is_tampered(cipher: EnvelopeCipher) -> None:
    one = json.loads(await cipher.seal("create-mailbox", new_id(), PAYLOAD))
    other = json.loads(await cipher.seal("create-mailbox", new_id(), {"other": True}))
    one.update(iv=other["iv"], ct=other["ct"], key=other["key"])

    error = await open_error(cipher, json.dumps(one))

    assert error.reason == "tampered"


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda d: d.update(ct=flip_bit(d["ct"], 0)), id="ciphertext-bit"),
        pytest.param(lambda d: d.update(ct=flip_bit(d["ct"], -1)), id="tag-bit"),
        pytest.param(lambda d: d.update(ct=b64(unb64(d["ct"])[:-1])), id="tag-truncated"),
        pytest.param(lambda d: d.update(iv=flip_bit(d["iv"], 5)), id="nonce-bit"),
    ],
)
async def test_modified_ciphertext_is_tampered(
    cipher: EnvelopeCipher, sealed: str, tamper: Callable[[dict[str, Any]], None]
) -> None:
    error = await open_error(cipher, edit(sealed, tamper))

    assert error.reason == "tampered"


async def test_a_valid_envelope_under_another_data_key_is_tampered(
    make_cipher: Callable[..., EnvelopeCipher],
) -> None:
    sealer = make_cipher(data_key_max_messages=1)
    first = json.loads(await sealer.seal("create-mailbox", new_id(), PAYLOAD))
    second = json.loads(await sealer.seal("create-mailbox", new_id(), PAYLOAD))
    first["key"] = second["key"]

    error = await open_error(make_cipher(), json.dumps(first))

    assert error.reason == "tampered"


# --- malformed and unsupported -----------------------------------------------------------


@pytest.mark.parametrize("version", [0, 2, 99])
async def test_unknown_version_is_unsupported(
    cipher: EnvelopeCipher, sealed: str, version: int
) -> None:
    error = await open_error(cipher, edit(sealed, lambda d: d.update(v=version)))

    assert error.reason == "unsupported_version"
    assert str(version) in str(error)


def _drop(*path: str) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        for name in path[:-1]:
            document = document[name]
        del document[path[-1]]

    return change


def _set(value: Any, *path: str) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        for name in path[:-1]:
            document = document[name]
        document[path[-1]] = value

    return change


MALFORMED_EDITS = {
    "no-v": _drop("v"),
    "v-string": _set("1", "v"),
    "v-bool": _set(True, "v"),
    "v-float": _set(1.0, "v"),
    "no-op": _drop("op"),
    "op-empty": _set("", "op"),
    "op-number": _set(7, "op"),
    "no-id": _drop("id"),
    "id-null": _set(None, "id"),
    "no-key": _drop("key"),
    "key-string": _set("arn:aws:kms:...", "key"),
    "no-kms": _drop("key", "kms"),
    "no-ek": _drop("key", "ek"),
    "ek-empty": _set("", "key", "ek"),
    "ek-bad-base64": _set("not base64!", "key", "ek"),
    "ek-too-long": _set(b64(b"x" * 6145), "key", "ek"),
    "no-iv": _drop("iv"),
    "iv-bad-base64": _set("AAAA*AAAAAAAAAAA", "iv"),
    "iv-non-ascii": _set("ÅÅÅÅÅÅÅÅÅÅÅÅÅÅÅÅ", "iv"),
    "iv-8-bytes": _set(b64(b"\x00" * 8), "iv"),
    "iv-16-bytes": _set(b64(b"\x00" * 16), "iv"),
    "no-ct": _drop("ct"),
    "ct-bad-padding": _set("AAA", "ct"),
    "ct-list": _set(["AAAA"], "ct"),
    "ct-shorter-than-tag": _set(b64(b"\x00" * 15), "ct"),
}


@pytest.mark.parametrize("change", MALFORMED_EDITS.values(), ids=MALFORMED_EDITS.keys())
async def test_malformed_fields(
    cipher: EnvelopeCipher, sealed: str, change: Callable[[dict[str, Any]], None]
) -> None:
    calls = KmsCalls()

    error = await open_error(cipher, edit(sealed, change))

    assert error.reason == "malformed"
    assert calls.total == 0


@pytest.mark.parametrize(
    "body",
    ["", "not json", "{", "[]", '["v", 1]', "null", "1", '"text"', b"\xff\xfe\x00", "[" * 100_000],
    ids=[
        "empty",
        "text",
        "truncated",
        "array",
        "list",
        "null",
        "number",
        "string",
        "bytes",
        "deep",
    ],
)
async def test_malformed_bodies(cipher: EnvelopeCipher, body: str | bytes) -> None:
    error = await open_error(cipher, body)

    assert error.reason == "malformed"


@pytest.mark.parametrize(
    "plaintext",
    [
        f'["{SECRET}"]'.encode(),
        f'"{SECRET}"'.encode(),
        f"{SECRET} is not JSON".encode(),
        b"\xff\xfe" + SECRET.encode(),
        b"",
    ],
    ids=["array", "string", "not-json", "not-utf8", "empty"],
)
async def test_payload_that_is_not_a_json_object_is_malformed(
    cipher: EnvelopeCipher, aws: AwsClients, resources: Resources, plaintext: bytes
) -> None:
    body = await forge(aws.kms, resources.data_key_arn, plaintext)

    error = await open_error(cipher, body)

    assert error.reason == "malformed"
    assert SECRET not in str(error)
    assert SECRET not in repr(error.args)
    assert error.__cause__ is None
    assert error.__context__ is None


# --- keys KMS will not open ------------------------------------------------------------------


async def test_encrypted_key_that_is_not_a_kms_blob_is_undecryptable(
    cipher: EnvelopeCipher, sealed: str
) -> None:
    error = await open_error(cipher, edit(sealed, _set(b64(b"not a kms blob"), "key", "ek")))

    assert error.reason == "undecryptable"


async def test_data_key_under_another_encryption_context_is_undecryptable(
    cipher: EnvelopeCipher, aws: AwsClients, resources: Resources
) -> None:
    body = await forge(
        aws.kms, resources.data_key_arn, b"{}", context={"purpose": "something-else"}
    )

    error = await open_error(cipher, body)

    assert error.reason == "undecryptable"


async def test_envelope_naming_another_key_is_undecryptable_without_asking_kms(
    cipher: EnvelopeCipher, aws: AwsClients, other_key: str
) -> None:
    body = await forge(aws.kms, other_key, b"{}")
    calls = KmsCalls()

    error = await open_error(cipher, body)

    assert error.reason == "undecryptable"
    assert calls.total == 0


async def test_with_an_alias_configured_messages_round_trip_across_processes(
    make_cipher: Callable[..., EnvelopeCipher], data_key_alias: str, resources: Resources
) -> None:
    sealer = make_cipher(kms_key_id=data_key_alias)
    opener = make_cipher(kms_key_id=data_key_alias)
    body = await sealer.seal("create-mailbox", new_id(), PAYLOAD)

    assert Envelope.parse(body).key_id == resources.data_key_arn
    assert (await opener.open(body)).payload == PAYLOAD


async def test_with_an_alias_configured_the_named_key_must_match_kms(
    make_cipher: Callable[..., EnvelopeCipher], data_key_alias: str, other_key: str
) -> None:
    body = await make_cipher().seal("create-mailbox", new_id(), PAYLOAD)
    # Our data key, but the envelope claims another KMS key encrypted it.
    relabelled = edit(body, _set(other_key, "key", "kms"))

    error = await open_error(make_cipher(kms_key_id=data_key_alias), relabelled)

    assert error.reason == "undecryptable"


# --- KMS failures are transient, never a reason to dead-letter -----------------------------


@contextlib.asynccontextmanager
async def kms_client_without_retries(settings: AwsSettings) -> AsyncIterator[Any]:
    """A KMS client with courier's timeouts but a single attempt per call.

    botocore's own retries (with backoff sleeps of seconds) are not what these tests are about.
    """
    config = client_config(settings).merge(
        AioConfig(retries={"mode": "standard", "total_max_attempts": 1})
    )
    async with get_session().create_client(
        "kms", region_name=settings.region, endpoint_url=settings.endpoint_url, config=config
    ) as client:
        yield client


@pytest.fixture
async def unreachable_kms(aws: AwsClients) -> AsyncIterator[Any]:
    """A KMS client whose endpoint refuses connections."""
    settings = AwsSettings(
        region="us-east-1",
        endpoint_url=f"http://127.0.0.1:{closed_port()}",
        connect_timeout_seconds=0.2,
        read_timeout_seconds=1,
    )
    async with kms_client_without_retries(settings) as client:
        yield client


async def test_unreachable_kms_is_transient(
    unreachable_kms: Any, resources: Resources, sealed: str
) -> None:
    cipher = EnvelopeCipher(unreachable_kms, EnvelopeSettings(kms_key_id=resources.data_key_arn))

    with pytest.raises(TransientError) as sealing:
        await cipher.seal("create-mailbox", new_id(), PAYLOAD)
    with pytest.raises(TransientError) as opening:
        await cipher.open(sealed)

    for error in (sealing.value, opening.value):
        assert not isinstance(error, EnvelopeError)
        assert is_retryable(error)
        assert error.__cause__ is not None


class StubKms:
    """An HTTP server that answers every KMS request with one configured error."""

    def __init__(self) -> None:
        self.status = 500
        self.code = "KMSInternalException"
        self.requests = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        await request.read()
        body = json.dumps({"__type": self.code, "message": "stub says no"})
        return web.Response(
            status=self.status, text=body, content_type="application/x-amz-json-1.1"
        )


@pytest.fixture
async def stub_kms(aws: AwsClients) -> AsyncIterator[tuple[StubKms, Any]]:
    """The stub server and a KMS client (no retries) pointed at it."""
    stub = StubKms()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", stub.handle)
    async with serving(app) as url:
        settings = AwsSettings(region="us-east-1", endpoint_url=url)
        async with kms_client_without_retries(settings) as client:
            yield stub, client


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (500, "KMSInternalException"),
        (503, "ServiceUnavailable"),
        (400, "ThrottlingException"),
        (400, "AccessDeniedException"),
        (400, "DisabledException"),
    ],
)
async def test_kms_error_answers_are_transient(
    stub_kms: tuple[StubKms, Any], resources: Resources, sealed: str, status: int, code: str
) -> None:
    stub, client = stub_kms
    stub.status, stub.code = status, code
    cipher = EnvelopeCipher(client, EnvelopeSettings(kms_key_id=resources.data_key_arn))

    with pytest.raises(TransientError, match=code):
        await cipher.seal("create-mailbox", new_id(), PAYLOAD)
    with pytest.raises(TransientError, match=code):
        await cipher.open(sealed)
    assert stub.requests == 2


async def test_a_failed_decrypt_is_not_cached(
    stub_kms: tuple[StubKms, Any], resources: Resources, sealed: str
) -> None:
    stub, client = stub_kms
    cipher = EnvelopeCipher(client, EnvelopeSettings(kms_key_id=resources.data_key_arn))

    for _ in range(3):
        with pytest.raises(TransientError):
            await cipher.open(sealed)

    assert stub.requests == 3


async def test_rotation_under_concurrency_with_one_message_per_key_does_not_spin(
    aws: AwsClients, fresh: Resources
) -> None:
    # Regression: a finished key-generation task was reused before its done-callback ran,
    # and 50 concurrent seals with max_messages=1 livelocked the event loop.
    settings = EnvelopeSettings(
        kms_key_id=fresh.data_key_arn, data_key_max_messages=1, decrypt_cache_size=0
    )
    cipher = EnvelopeCipher(aws.kms, settings)
    bodies = await asyncio.wait_for(
        asyncio.gather(*(cipher.seal("create-mailbox", f"id-{i}", {"i": i}) for i in range(50))), 30
    )
    assert len(set(bodies)) == 50


# --- key rotation: envelope.accepted_key_ids -----------------------------------------------


@pytest.fixture(scope="module")
async def other_key_alias(aws: AwsClients, other_key: str) -> str:
    """An alias of ``other_key``: the new key of a rotation, as operators name it."""
    alias = f"alias/envelope-new-{os.getpid()}"
    await aws.kms.create_alias(AliasName=alias, TargetKeyId=other_key)
    return alias


async def test_after_a_key_change_messages_under_the_previous_key_are_refused(
    make_cipher: Callable[..., EnvelopeCipher], other_key: str
) -> None:
    # Sealed before the rotation, under the old key (the session's data key).
    in_flight = await make_cipher().seal("create-mailbox", new_id(), PAYLOAD)

    error = await open_error(make_cipher(kms_key_id=other_key), in_flight)

    assert error.reason == "undecryptable"


async def test_after_a_key_change_accepted_key_ids_open_messages_under_the_previous_key(
    make_cipher: Callable[..., EnvelopeCipher], other_key: str, resources: Resources
) -> None:
    old_key = resources.data_key_arn
    in_flight = await make_cipher().seal("create-mailbox", new_id(), PAYLOAD)
    rotated = make_cipher(kms_key_id=other_key, accepted_key_ids=(old_key,))
    calls = KmsCalls()

    assert (await rotated.open(in_flight)).payload == PAYLOAD
    assert calls["Decrypt"] == 1
    # Sealing always uses kms_key_id, never an accepted key.
    assert Envelope.parse(await rotated.seal("create-mailbox", new_id(), PAYLOAD)).key_id == (
        other_key
    )


async def test_accepted_key_ids_may_be_aliases_on_both_sides(
    make_cipher: Callable[..., EnvelopeCipher],
    other_key_alias: str,
    data_key_alias: str,
) -> None:
    in_flight = await make_cipher(kms_key_id=data_key_alias).seal(
        "create-mailbox", new_id(), PAYLOAD
    )
    rotated = make_cipher(kms_key_id=other_key_alias, accepted_key_ids=(data_key_alias,))

    assert (await rotated.open(in_flight)).payload == PAYLOAD
    fresh_messages = await rotated.seal("create-mailbox", new_id(), PAYLOAD)
    assert (await make_cipher(kms_key_id=other_key_alias).open(fresh_messages)).payload == PAYLOAD


async def test_accepted_key_ids_as_bare_key_ids(
    make_cipher: Callable[..., EnvelopeCipher], other_key: str, resources: Resources
) -> None:
    in_flight = await make_cipher().seal("create-mailbox", new_id(), PAYLOAD)
    bare_old = resources.data_key_arn.rsplit("/", 1)[1]

    rotated = make_cipher(kms_key_id=other_key, accepted_key_ids=(bare_old,))

    assert (await rotated.open(in_flight)).payload == PAYLOAD


async def test_an_accepted_key_does_not_open_envelopes_of_any_other_key(
    make_cipher: Callable[..., EnvelopeCipher],
    aws: AwsClients,
    other_key: str,
    resources: Resources,
) -> None:
    third = (await aws.kms.create_key(Description="neither"))["KeyMetadata"]["Arn"]
    body = await forge(aws.kms, third, b"{}")
    calls = KmsCalls()

    cipher = make_cipher(kms_key_id=other_key, accepted_key_ids=(resources.data_key_arn,))
    error = await open_error(cipher, body)

    assert error.reason == "undecryptable"
    assert calls.total == 0


def test_accepted_key_ids_setting_loads_from_env_and_toml(tmp_path: Any) -> None:
    from service.settings import load_settings

    old = "arn:aws:kms:eu-west-1:123456789012:key/11111111-2222-3333-4444-555555555555"
    env = {"COURIER_ENVELOPE_ACCEPTED_KEY_IDS": f"{old}, alias/courier-2025"}
    assert load_settings(environ=env).envelope.accepted_key_ids == (old, "alias/courier-2025")
    path = tmp_path / "courier.toml"
    path.write_text(
        f'[envelope]\nkms_key_id = "alias/courier-2026"\naccepted_key_ids = ["{old}"]\n'
    )
    loaded = load_settings(path, environ={}).envelope
    assert (loaded.kms_key_id, loaded.accepted_key_ids) == ("alias/courier-2026", (old,))
    assert load_settings(environ={}).envelope.accepted_key_ids == ()


# --- stateless mode: a key per message ---------------------------------------------------

STATELESS_KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555"


class SlowKms:
    """Answers GenerateDataKey after ``delay`` seconds; records the most calls in flight."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.in_flight = 0
        self.peak = 0

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        body = {
            "KeyId": STATELESS_KEY_ARN,
            "Plaintext": base64.b64encode(os.urandom(32)).decode(),
            "CiphertextBlob": base64.b64encode(os.urandom(64)).decode(),
        }
        return web.Response(text=json.dumps(body), content_type="application/x-amz-json-1.1")


async def test_seals_that_each_need_a_key_ask_kms_concurrently() -> None:
    use_fake_credentials()
    kms = SlowKms(delay=0.05)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", kms.handle)
    async with serving(app) as url:
        settings = AwsSettings(region="us-east-1", endpoint_url=url)
        async with kms_client_without_retries(settings) as client:
            cipher = EnvelopeCipher(
                client, EnvelopeSettings(kms_key_id=STATELESS_KEY_ARN, data_key_max_messages=1)
            )
            bodies = await asyncio.gather(
                *(cipher.seal("create-mailbox", uuid.uuid4().hex, {"n": n}) for n in range(16))
            )

    keys = [Envelope.parse(body).encrypted_key for body in bodies]
    assert len(set(keys)) == 16  # still one data key per message
    assert kms.peak > 1  # today: 1, each seal waits for every earlier seal's KMS call
