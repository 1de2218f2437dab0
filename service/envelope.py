"""Envelope encryption of queued events: one KMS data key for many messages, AES-256-GCM each.

Wire format of an SQS message body, version 1::

    {"v": 1, "op": "create-mailbox", "id": "<request id>",
     "key": {"kms": "<KMS key ARN>", "ek": "<b64 KMS ciphertext of the data key>"},
     "iv": "<b64 96-bit nonce>", "ct": "<b64 AES-256-GCM ciphertext + 16-byte tag>"}

The header (``v``, ``op``, ``id``) is readable without any key, for routing and dead-letter
triage, and is the AES-GCM associated data as the compact, ASCII-only JSON array
``[v,"op","id"]``: a ciphertext moved under another header does not authenticate.

KMS is called once per data key, not once per message (README, "Envelope encryption"): KMS
bills and throttles per call, and one call per message would cap throughput at the account's
KMS quota. The sealing side reuses a data key for a bounded number of messages and seconds,
the opening side caches decrypted data keys by their KMS ciphertext, and both coalesce
concurrent KMS calls into one. Every KMS call carries the encryption context
``{"purpose": "courier-envelope"}``. The sealing data key is renewed on a timer shortly before
it expires, so a seal after a long idle does not wait for GenerateDataKey.

Key rotation: sealing always uses ``envelope.kms_key_id``; opening accepts data keys under it
and under ``envelope.accepted_key_ids`` (the previous keys), so messages already in the queue
when the key changes are still delivered. An envelope naming any other key is refused.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import random
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json_string
from types import MappingProxyType
from typing import Any

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import metrics
from .errors import (
    AWS_CODES,
    MISCONFIGURED,
    REFUSE,
    EnvelopeError,
    TransientError,
    aws_error_code,
    classify,
)
from .settings import EnvelopeSettings
from .singleflight import SingleFlight

__all__ = ["ENVELOPE_VERSION", "Envelope", "EnvelopeCipher", "OpenedEnvelope", "header_aad"]

ENVELOPE_VERSION = 1
ENCRYPTION_CONTEXT: Mapping[str, str] = MappingProxyType({"purpose": "courier-envelope"})
NONCE_BYTES = 12
TAG_BYTES = 16
DATA_KEY_BYTES = 32
# KMS's own bound on CiphertextBlob; anything longer cannot be a data key KMS produced.
MAX_ENCRYPTED_KEY_BYTES = 6144

# What KMS answers means what the "kms" row of service/errors.py says: a REFUSE it names (the
# encrypted data key cannot be opened here: InvalidCiphertextException, IncorrectKeyException)
# is the message's fault; everything else (outages, throttling, our own IAM or key state, a code
# no row names) is not, so it is retried.
# What a failed KMS call raises: botocore's errors, the HTTP stack's, and timeouts (OSError).
_KMS_FAILURES = (ClientError, BotoCoreError, aiohttp.ClientError, OSError)

# Bound once: these run per message on the hot path.
_generated = metrics.data_keys.labels("generated")
_decrypted = metrics.data_keys.labels("decrypted")
_cache_hits = metrics.data_keys.labels("cache_hit")

# Built once: json.dumps with any non-default option constructs a new encoder on every call.
_compact_ascii = json.JSONEncoder(separators=(",", ":"))
_compact_utf8 = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)

_CacheKey = tuple[str, bytes]  # (KMS key ARN, encrypted data key)

log = logging.getLogger("courier.envelope")

# The sealing key is renewed this share of its lifetime before it expires (at most
# RENEW_AHEAD_MAX_SECONDS): at the defaults, one GenerateDataKey every 270 s while idle.
RENEW_AHEAD_FRACTION = 0.1
RENEW_AHEAD_MAX_SECONDS = 30.0
# A failed renewal is retried from RETRY_FIRST_SECONDS, doubling up to RETRY_MAX_SECONDS (each
# capped by the key's lifetime), with jitter; the current key keeps sealing until it expires.
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0


def header_aad(version: int, op: str, message_id: str) -> bytes:
    """The associated data of an envelope: its header as canonical JSON bytes.

    The same bytes as ``json.dumps([version, op, message_id], separators=(",", ":"))``,
    built by hand because this runs twice per message and the encoder costs five times more.
    """
    return f"[{version:d},{_json_string(op)},{_json_string(message_id)}]".encode("ascii")


@dataclass(frozen=True, slots=True)
class Envelope:
    """One sealed message as it travels in the queue; the header is readable without a key."""

    op: str
    id: str
    key_id: str
    encrypted_key: bytes
    nonce: bytes
    ciphertext: bytes
    version: int = ENVELOPE_VERSION

    @property
    def aad(self) -> bytes:
        """The header bytes the ciphertext is bound to."""
        return header_aad(self.version, self.op, self.id)

    @classmethod
    def parse(cls, body: str | bytes) -> Envelope:
        """Read an SQS message body; raises EnvelopeError (malformed, unsupported_version)."""
        document = _load_object(body)
        _check_version(document)
        key = document.get("key")
        if not isinstance(key, dict):
            raise _malformed("field 'key' is missing or not an object")
        envelope = cls(
            op=_text(document, "op"),
            id=_text(document, "id"),
            key_id=_text(key, "kms", "key.kms"),
            encrypted_key=_base64(key, "ek", "key.ek"),
            nonce=_base64(document, "iv"),
            ciphertext=_base64(document, "ct"),
        )
        envelope._check_lengths()
        return envelope

    def serialize(self) -> str:
        """The SQS message body."""
        document = {
            "v": self.version,
            "op": self.op,
            "id": self.id,
            "key": {"kms": self.key_id, "ek": _b64(self.encrypted_key)},
            "iv": _b64(self.nonce),
            "ct": _b64(self.ciphertext),
        }
        return _compact_ascii.encode(document)

    def _check_lengths(self) -> None:
        if len(self.nonce) != NONCE_BYTES:
            raise _malformed(f"field 'iv' is {len(self.nonce)} bytes, expected {NONCE_BYTES}")
        if len(self.ciphertext) < TAG_BYTES:
            raise _malformed("field 'ct' is shorter than an AES-GCM tag")
        if not 0 < len(self.encrypted_key) <= MAX_ENCRYPTED_KEY_BYTES:
            raise _malformed("field 'key.ek' has an impossible length for a KMS ciphertext")


@dataclass(frozen=True, slots=True)
class OpenedEnvelope:
    """A decrypted, authenticated message: its header and its payload."""

    op: str
    id: str
    payload: dict[str, Any]


@dataclass(slots=True)
class _DataKey:
    """The data key this process seals with, and how much use it has left."""

    key_id: str
    encrypted_key: bytes
    aead: AESGCM
    expires_at: float
    remaining: int


class EnvelopeCipher:
    """Seals payloads into envelopes and opens them, calling KMS once per data key.

    ``kms_client`` is an aiobotocore KMS client; ``clock`` is monotonic seconds (injectable for
    tests). One instance per process: its data key and its decrypt cache are what save KMS calls.

    Once it has sealed, the cipher renews its data key on a timer before the key's age runs
    out, even when nothing is sealed: an idle process pays one GenerateDataKey per key lifetime
    (``data_key_max_age_seconds``) so that the first request after the idle does not. Call
    ``aclose`` after the last seal to stop the timer; a cipher dropped without it stops too
    (the timer holds it weakly).
    """

    def __init__(
        self,
        kms_client: Any,
        settings: EnvelopeSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._kms = kms_client
        self._settings = settings
        self._clock = clock
        self._data_key: _DataKey | None = None
        self._generation: SingleFlight[None, _DataKey] = SingleFlight()
        self._decryptions: SingleFlight[_CacheKey, AESGCM] = SingleFlight()
        self._keys = _KeyCache(
            settings.decrypt_cache_size, settings.decrypt_cache_ttl_seconds, clock
        )
        # The keys whose data keys this process opens: the sealing key first, then the
        # previous ones. Duplicates are dropped so a key is never asked twice.
        self._accepted = tuple(dict.fromkeys((settings.kms_key_id, *settings.accepted_key_ids)))
        self._renewal: asyncio.TimerHandle | None = None
        self._renewal_failures = 0
        self._closed = False

    async def seal(self, op: str, message_id: str, payload: Mapping[str, Any]) -> str:
        """Encrypt ``payload`` under the current data key; returns the SQS message body.

        Raises TransientError when KMS cannot produce a data key (outage, throttling, key state).
        """
        if not op or not message_id:
            raise ValueError("an envelope needs a non-empty op and id")
        document = payload if isinstance(payload, dict) else dict(payload)
        plaintext = _compact_utf8.encode(document).encode("utf-8")
        key = await self._current_key()
        nonce = os.urandom(NONCE_BYTES)
        aad = header_aad(ENVELOPE_VERSION, op, message_id)
        ciphertext = key.aead.encrypt(nonce, plaintext, aad)
        sealed = Envelope(op, message_id, key.key_id, key.encrypted_key, nonce, ciphertext)
        return sealed.serialize()

    async def open(self, body: str | bytes) -> OpenedEnvelope:
        """Authenticate and decrypt an SQS message body.

        Raises EnvelopeError (reason ``malformed``, ``unsupported_version``, ``undecryptable``
        or ``tampered``) when the message can never be opened, and TransientError when KMS
        is unavailable and a retry may succeed.
        """
        envelope = Envelope.parse(body)
        aead = await self._data_key_for(envelope)
        try:
            plaintext = aead.decrypt(envelope.nonce, envelope.ciphertext, envelope.aad)
        except InvalidTag:
            raise EnvelopeError(
                f"envelope {envelope.id!r}: ciphertext does not authenticate "
                "(modified, or moved under another header)",
                "tampered",
            ) from None
        return OpenedEnvelope(envelope.op, envelope.id, _payload(plaintext, envelope.id))

    async def aclose(self) -> None:
        """Stop renewing the data key: cancel the timer and a renewal in flight.

        Sealing still works afterwards (a key is generated when needed), but is no longer kept
        ready; call this once the last seal is done.
        """
        self._closed = True
        if self._renewal is not None:
            self._renewal.cancel()
            self._renewal = None
        await self._generation.cancel_all()

    async def _current_key(self) -> _DataKey:
        if self._settings.data_key_max_messages == 1:
            # A one-message key is never shared: waiting on a shared generation would only
            # queue each seal behind every earlier one (64 requests, 64 KMS calls in a row).
            own = await self._request_key()
            own.remaining = 0
            return own
        # A loop, not an if: seals that waited on one generation may use it up between them.
        while True:
            key = self._data_key
            if key is not None and key.remaining > 0 and self._clock() < key.expires_at:
                key.remaining -= 1
                return key
            await self._generation.run(None, self._generate)

    async def _generate(self) -> _DataKey:
        """A new data key, made the current one, its renewal timed."""
        key = await self._request_key()
        self._data_key = key
        self._renewal_failures = 0
        lifetime = self._settings.data_key_max_age_seconds
        ahead = min(RENEW_AHEAD_MAX_SECONDS, lifetime * RENEW_AHEAD_FRACTION)
        self._schedule_renewal(lifetime - ahead)
        return key

    async def _request_key(self) -> _DataKey:
        """One GenerateDataKey; the key is also kept for opening what it seals."""
        try:
            response = await self._kms.generate_data_key(
                KeyId=self._settings.kms_key_id,
                KeySpec="AES_256",
                EncryptionContext=dict(ENCRYPTION_CONTEXT),
            )
        except _KMS_FAILURES as exc:
            # Never the caller's fault: the API answers 503 and the client retries.
            raise _kms_unavailable("GenerateDataKey", exc) from exc
        _generated.inc()
        key = _DataKey(
            key_id=str(response["KeyId"]),
            encrypted_key=bytes(response["CiphertextBlob"]),
            aead=AESGCM(response["Plaintext"]),
            expires_at=self._clock() + self._settings.data_key_max_age_seconds,
            remaining=self._settings.data_key_max_messages,
        )
        # A process that opens its own messages should never ask KMS for a key it made.
        self._keys.put((key.key_id, key.encrypted_key), key.aead)
        return key

    def _schedule_renewal(self, delay: float) -> None:
        """Generate the next data key in ``delay`` seconds, replacing a renewal already timed."""
        if self._renewal is not None:
            self._renewal.cancel()
            self._renewal = None
        if not self._closed:
            # Weakly: a cipher its owner dropped without aclose must not keep calling KMS.
            loop = asyncio.get_running_loop()
            self._renewal = loop.call_later(delay, _renew_if_alive, weakref.ref(self))

    def _renew(self) -> None:
        self._renewal = None
        if not self._closed:
            # Shares a generation already running (a seal that found the key used up).
            task = self._generation.start(None, self._generate, name="envelope-data-key-renewal")
            task.add_done_callback(self._renewed)

    def _renewed(self, task: asyncio.Task[_DataKey]) -> None:
        error = None if task.cancelled() else task.exception()
        if self._closed or error is None:
            return
        self._renewal_failures += 1
        delay = self._retry_delay()
        self._schedule_renewal(delay)
        # Nobody awaits a renewal: this line is the only trace of its failure.
        log.warning(
            "renewing the envelope data key failed; sealing keeps the current key until it "
            "expires, retrying in %.1fs",
            delay,
            extra={
                "fields": {
                    "event": "data_key_renewal_failed",
                    "error": _describe(error),
                    "retry_in_seconds": round(delay, 3),
                }
            },
        )

    def _retry_delay(self) -> float:
        """Seconds before the next renewal attempt: exponential, capped, with equal jitter."""
        lifetime = self._settings.data_key_max_age_seconds
        first = min(RETRY_FIRST_SECONDS, lifetime / 100)
        doublings = min(self._renewal_failures - 1, 30)
        step = min(RETRY_MAX_SECONDS, lifetime / 10, first * 2**doublings)
        return random.uniform(step / 2, step)

    async def _data_key_for(self, envelope: Envelope) -> AESGCM:
        cache_key = (envelope.key_id, envelope.encrypted_key)
        aead = self._keys.get(cache_key)
        if aead is not None:
            _cache_hits.inc()
            return aead
        candidates = _candidate_keys(self._accepted, envelope.key_id)
        if not candidates:
            # The envelope names a key we know by ARN or id not to be ours: no KMS call.
            raise _foreign_key(envelope.key_id)
        return await self._decryptions.run(cache_key, lambda: self._decrypt(cache_key, candidates))

    async def _decrypt(self, cache_key: _CacheKey, candidates: tuple[str, ...]) -> AESGCM:
        key_id, encrypted_key = cache_key
        response = await self._decrypt_under_one_of(encrypted_key, candidates)
        _decrypted.inc()
        if response.get("KeyId") != key_id:
            raise _foreign_key(key_id)
        plaintext = response["Plaintext"]
        if len(plaintext) != DATA_KEY_BYTES:
            raise EnvelopeError("the data key is not an AES-256 key", "undecryptable")
        aead = AESGCM(plaintext)
        self._keys.put(cache_key, aead)
        return aead

    async def _decrypt_under_one_of(
        self, encrypted_key: bytes, candidates: tuple[str, ...]
    ) -> Mapping[str, Any]:
        """Decrypt naming each candidate key in turn (KMS refuses a data key of another key).

        Aliases cannot be matched without KMS, so each is tried; a refusal moves on to the
        next. The data key is undecryptable only when every candidate said so; any other
        failure (outage, our own IAM) is transient, never the message's fault.
        """
        failures: list[ClientError] = []
        for candidate in candidates:
            try:
                response: Mapping[str, Any] = await self._kms.decrypt(
                    CiphertextBlob=encrypted_key,
                    KeyId=candidate,
                    EncryptionContext=dict(ENCRYPTION_CONTEXT),
                )
                return response
            except ClientError as exc:
                failures.append(exc)
            except _KMS_FAILURES as exc:
                raise _kms_unavailable("Decrypt", exc) from exc
        for failure in failures:
            if not _undecryptable(failure):
                raise _kms_unavailable("Decrypt", failure) from failure
        code = aws_error_code(failures[-1])
        raise EnvelopeError(f"KMS cannot decrypt the data key ({code})", "undecryptable")


def _renew_if_alive(cipher: weakref.ref[EnvelopeCipher]) -> None:
    """The renewal timer's callback: renew the cipher's data key unless it is gone."""
    alive = cipher()
    if alive is not None:
        alive._renew()


def _candidate_keys(accepted: tuple[str, ...], envelope_key: str) -> tuple[str, ...]:
    """The accepted keys that may have made a data key the envelope says is ``envelope_key``.

    A key ARN or bare key id is compared with the envelope's key ARN here, and a match is the
    only candidate. Otherwise each alias (or alias ARN) is one: only KMS can resolve it.
    """
    aliases = tuple(key for key in accepted if _is_alias(key))
    for key in accepted:
        if key not in aliases and (key == envelope_key or envelope_key.endswith(f":key/{key}")):
            return (key,)
    return aliases


class _KeyCache:
    """Decrypted data keys by their encrypted form: a bounded LRU with a TTL; size 0 keeps none."""

    def __init__(self, size: int, ttl_seconds: float, clock: Callable[[], float]) -> None:
        self._size = size
        self._ttl = ttl_seconds
        self._clock = clock
        self._entries: OrderedDict[_CacheKey, tuple[float, AESGCM]] = OrderedDict()

    def get(self, key: _CacheKey) -> AESGCM | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires_at, aead = entry
        if self._clock() >= expires_at:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return aead

    def put(self, key: _CacheKey, aead: AESGCM) -> None:
        if self._size == 0:
            return
        self._entries[key] = (self._clock() + self._ttl, aead)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


def _load_object(body: str | bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _malformed("body is not JSON") from None
    if not isinstance(document, dict):
        raise _malformed("body is not a JSON object")
    return document


def _check_version(document: Mapping[str, Any]) -> None:
    # Checked before any other field: a later version may lay its fields out differently.
    version = document.get("v")
    if type(version) is not int:  # bool is an int subclass; true is not version 1
        raise _malformed("field 'v' is missing or not an integer")
    if version != ENVELOPE_VERSION:
        raise EnvelopeError(
            f"envelope version {version} is not supported (this build reads {ENVELOPE_VERSION})",
            "unsupported_version",
        )


def _text(document: Mapping[str, Any], name: str, label: str | None = None) -> str:
    value = document.get(name)
    if not isinstance(value, str) or not value:
        raise _malformed(f"field {label or name!r} is missing or not a non-empty string")
    return value


def _base64(document: Mapping[str, Any], name: str, label: str | None = None) -> bytes:
    try:
        return base64.b64decode(_text(document, name, label), validate=True)
    except ValueError:  # binascii.Error, and non-ASCII text
        raise _malformed(f"field {label or name!r} is not valid base64") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _payload(plaintext: bytes, message_id: str) -> dict[str, Any]:
    # Parse errors are dropped, not chained: JSONDecodeError carries the plaintext in `.doc`.
    try:
        payload = json.loads(plaintext)
    except (ValueError, RecursionError):
        payload = None
    if not isinstance(payload, dict):
        raise EnvelopeError(
            f"envelope {message_id!r}: the decrypted payload is not a JSON object", "malformed"
        )
    return payload


def _is_alias(key_id: str) -> bool:
    return key_id.startswith("alias/") or (key_id.startswith("arn:") and ":alias/" in key_id)


def _malformed(detail: str) -> EnvelopeError:
    return EnvelopeError(f"malformed envelope: {detail}", "malformed")


def _foreign_key(key_id: str) -> EnvelopeError:
    return EnvelopeError(
        f"the data key is not under this service's KMS key (envelope names {key_id!r})",
        "undecryptable",
    )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _undecryptable(exc: ClientError) -> bool:
    """KMS says the data key cannot be opened: a REFUSE the "kms" row names, nothing less.

    A code no row names falls back to REFUSE in the table, but that is no proof the message is
    at fault, so it is retried rather than dead-lettered.
    """
    code = aws_error_code(exc)
    return code in AWS_CODES["kms"] and classify(exc, "kms") is REFUSE


def _kms_unavailable(operation: str, exc: BaseException) -> TransientError:
    """A KMS failure that is not the message's: RETRY or MISCONFIGURED (service/errors.py).

    A refusal of sealing is courier's deployment too (its key, its context): 503 either way.
    """
    decision = classify(exc, "kms")
    return TransientError(
        f"KMS {operation} failed: {_describe(exc)}",
        decision=decision if decision.retryable else MISCONFIGURED,
    )
