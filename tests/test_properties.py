"""Property tests of the decoders that read what an attacker or a broken writer controls.

Every decoder here takes bytes or documents from outside courier's trust boundary: SQS bodies
(``Envelope.parse`` / ``EnvelopeCipher.open``), CredStash items (``SealedSecret``), the
decrypted event (``event_errors`` / ``render``) and the settings (env and TOML). The property
is the same for each: whatever comes in, the decoder answers with a valid result or its own
error class, never another exception, so the caller's single classification (DLQ reason,
secret integrity, one-line settings error) always applies.

KMS is moto's session server over HTTP; the examples are derandomised and bounded.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import os
import string
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import example, given
from hypothesis import strategies as st

from service.aws import AwsClients
from service.bootstrap import Resources
from service.envelope import (
    ENCRYPTION_CONTEXT,
    Envelope,
    EnvelopeCipher,
    OpenedEnvelope,
    header_aad,
)
from service.errors import EnvelopeError, SettingsError, TransientError
from service.operations import create_mailbox
from service.secrets.credstash import DIGESTS, SealedSecret, item_hmac
from service.secrets.errors import SecretIntegrityError, SecretNotFoundError
from service.settings import EnvelopeSettings, Settings, describe, load_settings

SETTINGS = hypothesis.settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
)
FEWER = hypothesis.settings(SETTINGS, max_examples=60)

ENVELOPE_REASONS = {"malformed", "unsupported_version", "undecryptable", "tampered"}

# --- shared strategies ----------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def b64_of(min_size: int = 0, max_size: int = 64) -> st.SearchStrategy[str]:
    return st.binary(min_size=min_size, max_size=max_size).map(b64)


# --- Envelope.parse on arbitrary input ------------------------------------------------------


def assert_parse_contained(body: str | bytes) -> None:
    try:
        envelope: Envelope | EnvelopeError = Envelope.parse(body)
    except EnvelopeError as exc:
        envelope = exc
    if isinstance(envelope, EnvelopeError):
        assert envelope.reason in ENVELOPE_REASONS
    else:
        assert envelope.op
        assert envelope.id


@SETTINGS
@given(body=st.binary(max_size=300) | st.text(max_size=300))
@example(body=b"\xff\xfe{")
@example(body=b"[" * 100_000)
@example(body='{"v": 1e999}')
@example(body='{"v": ' + "9" * 5000 + "}")
@example(body='{"v": true}')
@example(body="\ud800")
def test_parse_of_arbitrary_bytes_is_an_envelope_or_an_envelope_error(body: str | bytes) -> None:
    assert_parse_contained(body)


def envelope_documents(key_ids: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Documents shaped like an envelope, each field either plausible or any JSON value."""
    plausible = {
        "v": st.sampled_from([1, 0, 2, -1, True, "1", 1.0]) | json_values,
        "op": st.sampled_from(["create-mailbox", "", "x" * 300]) | st.text(max_size=20),
        "id": st.text(string.hexdigits, min_size=1, max_size=40) | st.text(max_size=20),
        "key": st.fixed_dictionaries(
            {},
            optional={
                "kms": key_ids | json_values,
                "ek": b64_of(0, 300) | st.text(max_size=20) | json_values,
            },
        )
        | json_values,
        "iv": b64_of(0, 20) | st.just(b64(bytes(12))) | json_values,
        "ct": b64_of(0, 80) | st.text(max_size=20) | json_values,
    }
    return st.fixed_dictionaries({}, optional=plausible)


@SETTINGS
@given(document=envelope_documents(st.text(max_size=30)) | json_values)
def test_parse_of_arbitrary_json_is_an_envelope_or_an_envelope_error(document: Any) -> None:
    assert_parse_contained(json.dumps(document))


# --- EnvelopeCipher.open: forged, mutated and moved envelopes -------------------------------


@pytest.fixture(scope="module")
def cipher(aws: AwsClients, resources: Resources) -> EnvelopeCipher:
    return EnvelopeCipher(aws.kms, EnvelopeSettings(kms_key_id=resources.data_key_arn))


@pytest.fixture(scope="module")
async def data_key(aws: AwsClients, resources: Resources) -> tuple[bytes, bytes]:
    """(plaintext, encrypted) of a real data key under courier's KMS key."""
    response = await aws.kms.generate_data_key(
        KeyId=resources.data_key_arn, KeySpec="AES_256", EncryptionContext=dict(ENCRYPTION_CONTEXT)
    )
    return bytes(response["Plaintext"]), bytes(response["CiphertextBlob"])


def run_on(loop: asyncio.AbstractEventLoop, coroutine: Any) -> Any:
    """Run ``coroutine`` on the test's event loop from hypothesis's thread."""
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=30)


async def open_contained(
    cipher: EnvelopeCipher, body: str, *, moto_access_denied: bool = False
) -> OpenedEnvelope | BaseException:
    """The opened envelope or the EnvelopeError; any other exception fails the property.

    ``moto_access_denied``: moto answers AccessDeniedException where AWS answers
    InvalidCiphertextException/IncorrectKeyException (a blob whose key reference is not one of
    its keys), and courier retries AccessDenied on purpose (it is also what our own broken IAM
    looks like). That TransientError is tolerated when the test asks.
    """
    try:
        return await cipher.open(body)
    except EnvelopeError as exc:
        outcome: BaseException = exc
    except TransientError as exc:
        if not (moto_access_denied and "AccessDeniedException" in str(exc)):
            raise
        outcome = exc
    if isinstance(outcome, EnvelopeError):
        assert outcome.reason in ENVELOPE_REASONS
    return outcome


async def test_open_of_forged_envelopes_is_an_envelope_error(
    cipher: EnvelopeCipher, resources: Resources
) -> None:
    """Valid-looking JSON naming courier's own KMS key, with random key, nonce and ciphertext."""
    loop = asyncio.get_running_loop()
    arn = resources.data_key_arn
    key_ids = st.sampled_from([arn, arn.replace("key/", "key/0"), "alias/courier", ""])

    @FEWER
    @given(document=envelope_documents(key_ids))
    @example(
        document={
            "v": 1,
            "op": "create-mailbox",
            "id": "f" * 32,
            "key": {"kms": arn, "ek": b64(os.urandom(184))},
            "iv": b64(os.urandom(12)),
            "ct": b64(os.urandom(64)),
        }
    )
    def check(document: dict[str, Any]) -> None:
        outcome = run_on(loop, open_contained(cipher, json.dumps(document)))
        # Nothing but a sealed payload opens: a forged document never yields one.
        assert isinstance(outcome, EnvelopeError), outcome

    await asyncio.to_thread(check)


MUTATIONS = ("flip_ct", "flip_iv", "flip_ek", "swap_id", "swap_op", "version", "truncate_ct")


def mutate(document: dict[str, Any], how: str, position: int, other_id: str) -> dict[str, Any]:
    copy = json.loads(json.dumps(document))

    def flip(text: str) -> str:
        raw = bytearray(base64.b64decode(text))
        raw[position % len(raw)] ^= 1 << (position % 8)
        return b64(bytes(raw))

    if how == "flip_ct":
        copy["ct"] = flip(copy["ct"])
    elif how == "flip_iv":
        copy["iv"] = flip(copy["iv"])
    elif how == "flip_ek":
        copy["key"]["ek"] = flip(copy["key"]["ek"])
    elif how == "swap_id":
        copy["id"] = other_id
    elif how == "swap_op":
        copy["op"] = "delete-mailbox"
    elif how == "version":
        copy["v"] = 2
    else:
        copy["ct"] = b64(base64.b64decode(copy["ct"])[: position % 16 + 16])
    return copy


async def test_open_of_mutated_envelopes_never_yields_a_payload(cipher: EnvelopeCipher) -> None:
    """A valid ciphertext moved under another id or op, or any bit flipped: always refused."""
    loop = asyncio.get_running_loop()
    payload = {"mailbox": {"username": "jane.doe"}, "identity_id": "idm-1"}
    original = json.loads(await cipher.seal("create-mailbox", "a" * 32, payload))

    @FEWER
    @given(
        how=st.sampled_from(MUTATIONS),
        position=st.integers(min_value=0, max_value=10_000),
        other_id=st.text(string.hexdigits, min_size=1, max_size=32).filter(lambda i: i != "a" * 32),
    )
    def check(how: str, position: int, other_id: str) -> None:
        body = json.dumps(mutate(original, how, position, other_id))
        outcome = run_on(loop, open_contained(cipher, body, moto_access_denied=how == "flip_ek"))
        if isinstance(outcome, TransientError):
            return  # a flipped byte in moto's key reference: see open_contained
        assert isinstance(outcome, EnvelopeError), (how, outcome)
        expected = {
            "swap_id": {"tampered"},
            "swap_op": {"tampered"},
            "version": {"unsupported_version"},
            "flip_ct": {"tampered"},
            "flip_iv": {"tampered"},
            "truncate_ct": {"tampered"},
            "flip_ek": {"undecryptable", "malformed"},
        }[how]
        assert outcome.reason in expected, (how, outcome.reason, str(outcome))

    await asyncio.to_thread(check)


async def test_open_of_any_plaintext_under_a_real_key(
    cipher: EnvelopeCipher, resources: Resources, data_key: tuple[bytes, bytes]
) -> None:
    """Someone holding a data key seals arbitrary bytes: only JSON objects open."""
    loop = asyncio.get_running_loop()
    plaintext_key, encrypted_key = data_key

    @FEWER
    @given(
        plaintext=st.binary(max_size=200)
        | json_values.map(lambda value: json.dumps(value).encode())
        | st.just(b"[" * 50_000)
        | st.just(b'{"a": NaN}')
    )
    def check(plaintext: bytes) -> None:
        nonce = os.urandom(12)
        aad = header_aad(1, "create-mailbox", "b" * 32)
        sealed = Envelope(
            "create-mailbox",
            "b" * 32,
            resources.data_key_arn,
            encrypted_key,
            nonce,
            AESGCM(plaintext_key).encrypt(nonce, plaintext, aad),
        )
        outcome = run_on(loop, open_contained(cipher, sealed.serialize()))
        if isinstance(outcome, EnvelopeError):
            assert outcome.reason == "malformed"
        else:
            assert isinstance(outcome.payload, dict)

    await asyncio.to_thread(check)


# --- the decrypted event: validation and rendering ------------------------------------------

XML_FORBIDDEN = {chr(c) for c in range(0x20) if chr(c) not in "\t\n\r"} | {"\ufffe", "\uffff"}

valid_usernames = st.from_regex(r"\A[a-z][a-z0-9._-]{2,31}\Z")
request_payloads = st.fixed_dictionaries(
    {
        "username": valid_usernames,
        "display_name": st.text(min_size=1, max_size=128),
        "plan": st.sampled_from(["basic", "standard", "premium"]),
        "contact_email": st.from_regex(r"\A[a-z0-9.+]{1,20}@[a-z0-9-]{1,20}\.[a-z]{2,6}\Z"),
    },
    optional={
        "msisdn": st.from_regex(r"\A\+[1-9][0-9]{6,14}\Z"),
        "quota_mb": st.integers(min_value=100, max_value=102400),
        "locale": st.sampled_from(["en", "da-DK", "fr"]),
        "aliases": st.lists(valid_usernames, max_size=3, unique=True),
    },
)


@SETTINGS
@given(
    event=json_values
    | st.dictionaries(
        st.sampled_from(["mailbox", "identity_id", "requested_by", "requested_at"]), json_values
    )
)
def test_event_validation_of_arbitrary_json_never_raises(event: Any) -> None:
    problems = create_mailbox.event_errors(event)
    assert all(isinstance(problem, str) for problem in problems)
    if not problems:  # whatever validates renders for every target format
        for target_format in ("json", "soap"):
            create_mailbox.render(target_format, "r" * 32, event)


@SETTINGS
@given(payload=request_payloads)
@example(
    payload={
        "username": "jane",
        "display_name": "Jane\x01",
        "plan": "basic",
        "contact_email": "j@x.io",
    }
)
def test_every_accepted_request_renders_for_every_target(payload: dict[str, Any]) -> None:
    """What the API accepts (202) must be deliverable: valid event, well-formed JSON and XML."""
    if create_mailbox.validation_errors(payload):
        return
    event = create_mailbox.event(payload, "idm-1", "tester", "2026-01-01T00:00:00.000Z")
    assert create_mailbox.event_errors(event) == []
    body, _ = create_mailbox.render("json", "r" * 32, event)
    assert json.loads(body)["mailbox"]["username"] == payload["username"]
    soap, _ = create_mailbox.render("soap", "r" * 32, event)
    ET.fromstring(soap)  # a SOAP service refuses ill-formed XML (400 -> DLQ, never delivered)
    assert not XML_FORBIDDEN & set(payload["display_name"])


# --- CredStash items ------------------------------------------------------------------------

DATA_KEY_BYTES = 64  # what credstash asks KMS for: 32 AES + 32 HMAC


def dynamodb_values(
    inner: st.SearchStrategy[Any] | None = None,
) -> st.SearchStrategy[dict[str, Any]]:
    """Low-level DynamoDB attribute values, as aiobotocore returns them."""
    scalars = st.one_of(
        st.text(max_size=40).map(lambda s: {"S": s}),
        st.integers().map(lambda n: {"N": str(n)}),
        st.binary(max_size=40).map(lambda b: {"B": b}),
        st.booleans().map(lambda b: {"BOOL": b}),
        st.just({"NULL": True}),
        st.lists(st.text(max_size=5), min_size=1, max_size=3, unique=True).map(lambda s: {"SS": s}),
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=3).map(lambda items: {"L": items})
            | st.dictionaries(st.text(max_size=5), inner, max_size=3).map(lambda m: {"M": m})
        ),
        max_leaves=6,
    )


def credstash_items() -> st.SearchStrategy[dict[str, Any]]:
    """Items shaped like CredStash's, every attribute plausible, absent or of another type."""
    hexes = st.binary(max_size=64).map(lambda b: b.hex())
    return st.fixed_dictionaries(
        {},
        optional={
            "name": st.text(max_size=20).map(lambda s: {"S": s}) | dynamodb_values(),
            "version": st.integers(0, 10**19).map(lambda n: {"S": str(n).zfill(19)})
            | dynamodb_values(),
            "key": b64_of(0, 200).map(lambda s: {"S": s}) | dynamodb_values(),
            "contents": b64_of(0, 80).map(lambda s: {"S": s}) | dynamodb_values(),
            "hmac": hexes.map(lambda s: {"S": s})
            | hexes.map(lambda s: {"B": s.encode()})
            | dynamodb_values(),
            "digest": st.sampled_from([*DIGESTS, "sha256", "WHIRLPOOL", ""]).map(lambda s: {"S": s})
            | dynamodb_values(),
        },
    )


def assert_secret_contained(item: Any, data_key: bytes) -> None:
    try:
        sealed = SealedSecret.from_item(item)
        value = sealed.open(data_key)
    except (SecretIntegrityError, SecretNotFoundError):
        return
    assert isinstance(value, str)


@SETTINGS
@given(item=credstash_items(), data_key=st.binary(min_size=DATA_KEY_BYTES, max_size=DATA_KEY_BYTES))
def test_credstash_items_as_dynamodb_returns_them(item: dict[str, Any], data_key: bytes) -> None:
    assert_secret_contained(item, data_key)


def matching_items(data_key: bytes, ciphertext: bytes, digest: str) -> dict[str, Any]:
    """An item whose HMAC verifies under ``data_key``: opening reaches the AES step."""
    mac = item_hmac(data_key[len(data_key) // 2 :], ciphertext, digest, "probe")
    return {
        "name": {"S": "probe"},
        "version": {"S": "1".zfill(19)},
        "key": {"S": b64(b"wrapped")},
        "contents": {"S": b64(ciphertext)},
        "hmac": {"S": binascii.hexlify(mac).decode()},
        "digest": {"S": digest},
    }


@SETTINGS
@given(
    data_key=st.binary(max_size=130),
    ciphertext=st.binary(max_size=64),
    digest=st.sampled_from(sorted(DIGESTS)),
)
@example(data_key=b"k" * 40, ciphertext=b"x", digest="SHA256")
def test_open_with_any_data_key_length(data_key: bytes, ciphertext: bytes, digest: str) -> None:
    assert_secret_contained(matching_items(data_key, ciphertext, digest), data_key)


@SETTINGS
@given(
    item=st.dictionaries(
        st.sampled_from(["name", "version", "key", "contents", "hmac", "digest"]), json_values
    )
    | json_values
)
@example(item={"name": "x"})
@example(item=[])
def test_credstash_items_of_any_shape(item: Any) -> None:
    assert_secret_contained(item, b"k" * DATA_KEY_BYTES)


# --- settings -------------------------------------------------------------------------------

ENV_NAMES = sorted({env_name for _, env_name, _, _ in describe()} - {"COURIER_CONFIG"})
TRICKY_VALUES = [
    "nan",
    "NaN",
    "inf",
    "-inf",
    "1e309",
    "-0",
    "0x10",
    "1_000",
    "  7  ",
    "9" * 5000,
    "http://[",
    "http://[::1",
    "http://host:99999",
    "https://",
    "ftp://x",
    "",
    "\x00",
    "true",
    "yes",
    "ALL",
    "debug",
    "[" * 10_000,
    '[{"name": "a", "url": "http://x", "concurrency": 1e999}]',
    '[{"name": "a", "url": "http://x", "timeout_seconds": NaN}]',
    '[{"name": "a", "url": "http://x"}, {"name": "a", "url": "http://y"}]',
    '[{"name": "a", "url": "http://[", "format": "soap"}]',
    '{"name": "a"}',
    "[]",
]
env_values = st.sampled_from(TRICKY_VALUES) | st.text(max_size=30)
environments = st.dictionaries(
    st.sampled_from([*ENV_NAMES, "COURIER_TARGETS", "COURIER_NOT_A_SETTING"]),
    env_values,
    max_size=6,
)


@pytest.fixture(scope="module")
def empty_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty config file, so the loader never reads the machine's /etc/courier/courier.toml."""
    path = tmp_path_factory.mktemp("settings") / "empty.toml"
    path.write_text("")
    return path


def numbers_are_sane(settings: Settings) -> None:
    """Every number a loaded Settings carries is finite and within its declared bounds."""
    import dataclasses

    def walk(value: Any, where: str) -> None:
        if dataclasses.is_dataclass(value):
            for item in dataclasses.fields(value):
                field_value = getattr(value, item.name)
                if isinstance(field_value, int | float) and not isinstance(field_value, bool):
                    assert math.isfinite(field_value), f"{where}.{item.name} = {field_value!r}"
                    low, high = item.metadata.get("min"), item.metadata.get("max")
                    assert low is None or field_value >= low, f"{where}.{item.name}"
                    assert high is None or field_value <= high, f"{where}.{item.name}"
                walk(field_value, f"{where}.{item.name}")
        elif isinstance(value, tuple):
            for index, entry in enumerate(value):
                walk(entry, f"{where}[{index}]")

    walk(settings, "settings")


def load_contained(config: Path | None, environ: Mapping[str, str]) -> None:
    try:
        settings = load_settings(config, environ)
    except SettingsError:
        return
    numbers_are_sane(settings)


# The settings loaders once had "known escape" twins that filtered out the reported bugs;
# those are fixed, so one property per loader covers every input, with the examples the
# twins used to spend on the rest.
MORE = hypothesis.settings(SETTINGS, max_examples=300)


@MORE
@given(environ=environments)
@example(environ={"COURIER_HTTP_DRAIN_SECONDS": "nan"})
@example(environ={"COURIER_AWS_ENDPOINT_URL": "http://["})
@example(environ={"COURIER_TARGETS": "[" * 10_000})
@example(environ={"COURIER_TARGETS": '[{"name": "a", "url": "http://x", "concurrency": 1e999}]'})
@example(environ={"COURIER_TARGETS": '[{"name": "a", "url": "http://x", "timeout_seconds": NaN}]'})
@example(environ={"COURIER_HTTP_PORT": "inf", "COURIER_WORKER_POLLERS": "1e309"})
def test_settings_from_any_environment(environ: dict[str, str], empty_config: Path) -> None:
    load_contained(empty_config, environ)


toml_scalars = (
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(str)
    | st.floats().map(
        lambda f: (
            "nan" if math.isnan(f) else ("inf" if f > 0 else "-inf") if math.isinf(f) else repr(f)
        )
    )
    | st.booleans().map(lambda b: "true" if b else "false")
    | st.text(max_size=20).map(json.dumps)
    | st.sampled_from(TRICKY_VALUES).map(json.dumps)
    | st.just("[]")
    | st.just('["a", "b"]')
)
SECTIONS = {
    "": ["role", "instance"],
    "http": ["port", "drain_seconds", "max_body_bytes", "reuse_port"],
    "aws": ["endpoint_url", "read_timeout_seconds", "max_pool_connections"],
    "worker": ["max_in_flight", "pollers", "wait_seconds", "backoff_max_seconds"],
    "secrets": ["ttl_seconds", "prefetch", "cache_enabled"],
    "log": ["level", "nope"],
}


@st.composite
def toml_documents(draw: st.DrawFn) -> str:
    lines: list[str] = []
    for section, names in SECTIONS.items():
        chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=3))
        if section and chosen:
            lines.append(f"[{section}]")
        lines += [f"{name} = {draw(toml_scalars)}" for name in chosen]
    if draw(st.booleans()):
        lines.append("[[targets]]")
        lines += [
            f"{name} = {draw(toml_scalars)}"
            for name in draw(
                st.lists(
                    st.sampled_from(["name", "url", "timeout_seconds", "concurrency", "format"]),
                    unique=True,
                    max_size=4,
                )
            )
        ]
    if draw(st.integers(0, 9)) == 0:
        lines.append(draw(st.text(max_size=30)))  # sometimes not TOML at all
    return "\n".join(lines) + "\n"


def load_toml(text: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as handle:
        handle.write(text)
    try:
        load_contained(Path(handle.name), {})
    finally:
        os.unlink(handle.name)


@MORE
@given(text=toml_documents())
@example(text="[http]\nport = inf\n")
@example(text="[aws]\nread_timeout_seconds = -inf\n")
@example(text='[[targets]]\nurl = "http://["\n')
@example(text="[http]\ndrain_seconds = nan\n")
@example(text="a = " + "[" * 5000 + "\n")
def test_settings_from_any_toml_file(text: str) -> None:
    load_toml(text)


@FEWER
@given(
    instance=st.integers(min_value=0, max_value=999),
    role=st.sampled_from(["all", "api", "worker"]),
    port=st.integers(min_value=0, max_value=65535),
)
def test_to_toml_round_trips(instance: int, role: str, port: int, empty_config: Path) -> None:
    import dataclasses

    from service.settings import to_toml

    base = load_settings(empty_config, {})
    settings = base.replace(
        role=role, instance=instance, http=dataclasses.replace(base.http, port=port)
    )
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as handle:
        handle.write(to_toml(settings))
    try:
        assert load_settings(Path(handle.name), {}) == settings
    finally:
        os.unlink(handle.name)
