"""Async reader and writer of the CredStash format (credstash 1.17), over aiobotocore.

An item in the table (``name`` HASH, ``version`` RANGE, zero-padded to 19 digits) holds:
``key`` = base64 KMS ciphertext of a 64-byte data key (32 bytes AES-256, 32 bytes HMAC),
``contents`` = base64 AES-CTR ciphertext (initial counter block 15 zero bytes + 0x01),
``hmac`` = hex HMAC of the ciphertext (String, or Binary holding ASCII hex), ``digest``.
The KMS calls carry the caller's encryption context, exactly as the ``credstash`` CLI does
with ``credstash get NAME k=v``; the daemon passes its deployment's context
(``secrets.encryption_context``) so that IAM can scope its Decrypt to that context. After a
Decrypt, the key KMS reports is checked against the expected CredStash key
(``secrets.kms_key_id``): a secret planted under any other key the role may use is refused.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac as hmac_module
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.hmac import HMAC

from ..errors import MISCONFIGURED, RETRY, classify
from ..settings import SecretSettings
from .errors import (
    SecretError,
    SecretIntegrityError,
    SecretMisconfiguredError,
    SecretNotFoundError,
    SecretUnavailableError,
)

PAD_LEN = 19
LEGACY_NONCE = b"\x00" * 15 + b"\x01"
DEFAULT_DIGEST = "SHA256"
DIGESTS: Mapping[str, type[hashes.HashAlgorithm]] = {
    "SHA": hashes.SHA1,
    "SHA224": hashes.SHA224,
    "SHA256": hashes.SHA256,
    "SHA384": hashes.SHA384,
    "SHA512": hashes.SHA512,
    "MD5": hashes.MD5,
}


def padded_version(version: int | str) -> str:
    """A version as CredStash stores it: decimal, left-padded with zeros to 19 digits."""
    text = str(version)
    if len(text) >= PAD_LEN:
        return text
    try:
        return str(int(text)).zfill(PAD_LEN)
    except ValueError:
        raise SecretNotFoundError(f"version {text!r} is not a CredStash version number") from None


@dataclass(frozen=True, slots=True)
class SealedSecret:
    """One CredStash item as read from the table, still encrypted."""

    name: str
    version: str
    wrapped_key: bytes
    ciphertext: bytes
    hmac: bytes
    digest: str

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> SealedSecret:
        """Parse a low-level DynamoDB item (``{"name": {"S": ...}, ...}``)."""
        if not isinstance(item, Mapping):
            raise SecretIntegrityError("malformed CredStash item (not a map of attributes)")
        try:
            name = _text(item, "name")
        except TypeError:
            name = "?"  # only used in messages; the fields below decide validity
        try:
            hmac_attr = item["hmac"]
            hex_hmac = hmac_attr["S"] if "S" in hmac_attr else bytes(hmac_attr["B"]).decode("ascii")
            return cls(
                name=name,
                version=_text(item, "version"),
                wrapped_key=base64.b64decode(item["key"]["S"], validate=True),
                ciphertext=base64.b64decode(item["contents"]["S"], validate=True),
                hmac=binascii.unhexlify(hex_hmac),
                digest=_text(item, "digest", DEFAULT_DIGEST),
            )
        except (KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError) as exc:
            raise SecretIntegrityError(
                f"secret {name!r}: malformed CredStash item ({exc})"
            ) from None

    def open(self, data_key: bytes) -> str:
        """Check the HMAC, then decrypt; raises SecretIntegrityError on any mismatch."""
        if len(data_key) != 64:
            raise SecretIntegrityError(
                f"secret {self.name!r}: data key is {len(data_key)} bytes, CredStash uses 64"
            )
        aes_key, hmac_key = data_key[: len(data_key) // 2], data_key[len(data_key) // 2 :]
        expected = item_hmac(hmac_key, self.ciphertext, self.digest, self.name)
        if not hmac_module.compare_digest(expected, self.hmac):
            raise SecretIntegrityError(
                f"secret {self.name!r} version {self.version.lstrip('0') or '0'}: HMAC mismatch "
                "(the item was modified or sealed with another key)"
            )
        decryptor = Cipher(algorithms.AES(aes_key), modes.CTR(LEGACY_NONCE)).decryptor()
        plaintext = decryptor.update(self.ciphertext) + decryptor.finalize()
        try:
            return plaintext.decode("utf-8")
        except UnicodeDecodeError:
            raise SecretIntegrityError(f"secret {self.name!r}: plaintext is not UTF-8") from None


def _text(item: Mapping[str, Any], attribute: str, default: str | None = None) -> str:
    """A String attribute of a low-level item; anything else is a malformed item."""
    value = item.get(attribute)
    if value is None and default is not None:
        return default
    if not isinstance(value, Mapping) or not isinstance(value.get("S"), str):
        raise TypeError(f"attribute {attribute!r} is not a string")
    return str(value["S"])


def seal(secret: str, data_key: bytes, digest: str = DEFAULT_DIGEST) -> tuple[bytes, bytes]:
    """Encrypt ``secret`` as CredStash does; returns (ciphertext, raw HMAC)."""
    aes_key, hmac_key = data_key[:32], data_key[32:]
    encryptor = Cipher(algorithms.AES(aes_key), modes.CTR(LEGACY_NONCE)).encryptor()
    ciphertext = encryptor.update(secret.encode("utf-8")) + encryptor.finalize()
    return ciphertext, item_hmac(hmac_key, ciphertext, digest, "(new)")


def item_hmac(key: bytes, data: bytes, digest: str, name: str) -> bytes:
    """The HMAC CredStash stores with an item: ``digest`` over ``data`` under ``key``.

    ``name`` only labels the SecretIntegrityError raised for an unsupported digest.
    """
    algorithm = DIGESTS.get(digest.upper())
    if algorithm is None:
        raise SecretIntegrityError(f"secret {name!r}: unsupported digest {digest!r}")
    mac = HMAC(key, algorithm())
    mac.update(data)
    return mac.finalize()


class CredStash:
    """Reads and writes secrets in a CredStash table through shared aiobotocore clients.

    ``context`` is the encryption context used when a call passes none (the deployment's).
    ``kms_key_id`` (ARN, bare id or alias) is the key every secret's data key must be under,
    as KMS reports it on Decrypt; anything but a key ARN is resolved once with DescribeKey.
    An empty ``kms_key_id`` accepts any key.
    """

    def __init__(
        self,
        dynamodb: Any,
        kms: Any,
        table: str = "credential-store",
        *,
        context: Mapping[str, str] | None = None,
        kms_key_id: str = "",
    ) -> None:
        self._dynamodb = dynamodb
        self._kms = kms
        self.table = table
        self.context: Mapping[str, str] = dict(context or {})
        self.kms_key_id = kms_key_id
        self._key_arn: str | None = kms_key_id if _is_key_arn(kms_key_id) else None
        self._resolving = asyncio.Lock()

    @classmethod
    def from_settings(cls, dynamodb: Any, kms: Any, settings: SecretSettings) -> CredStash:
        """The store as the daemon and the CLI use it: table, context and key from settings."""
        return cls(
            dynamodb,
            kms,
            settings.table,
            context=settings.encryption_context,
            kms_key_id=settings.kms_key_id,
        )

    async def get(
        self, name: str, version: str | None = None, context: Mapping[str, str] | None = None
    ) -> str:
        """The plaintext of ``name`` (latest version unless ``version``).

        ``context`` None means this store's context; pass ``{}`` for explicitly none.
        """
        sealed = await self._read(name, version)
        data_key = await self._decrypt_key(sealed, self.context if context is None else context)
        return sealed.open(data_key)

    async def put(
        self,
        name: str,
        secret: str,
        *,
        kms_key: str | None = None,
        version: str | None = None,
        context: Mapping[str, str] | None = None,
        digest: str = DEFAULT_DIGEST,
    ) -> str:
        """Store a new version of ``name`` (next version when ``version`` is None); returns it.

        ``kms_key`` None means this store's key, else credstash's default ``alias/credstash``;
        ``context`` None means this store's context.
        """
        if version is None:
            latest = await self.latest_version(name)
            version = str(int(latest) + 1 if latest else 1)
        response = await self._call(
            self._kms.generate_data_key,
            name,
            source="kms",
            KeyId=kms_key or self.kms_key_id or "alias/credstash",
            NumberOfBytes=64,
            EncryptionContext=dict(self.context if context is None else context),
        )
        ciphertext, raw_hmac = seal(secret, response["Plaintext"], digest)
        item = {
            "name": {"S": name},
            "version": {"S": padded_version(version)},
            "key": {"S": base64.b64encode(response["CiphertextBlob"]).decode()},
            "contents": {"S": base64.b64encode(ciphertext).decode()},
            "hmac": {"S": raw_hmac.hex()},
            "digest": {"S": digest},
        }
        await self._call(
            self._dynamodb.put_item,
            name,
            TableName=self.table,
            Item=item,
            ConditionExpression="attribute_not_exists(#n)",
            ExpressionAttributeNames={"#n": "name"},
        )
        return padded_version(version)

    async def latest_version(self, name: str) -> str | None:
        """The highest stored version of ``name``, or None when there is none."""
        response = await self._query_latest(name, projection="version")
        items = response.get("Items", [])
        return str(items[0]["version"]["S"]) if items else None

    async def _read(self, name: str, version: str | None) -> SealedSecret:
        if version:
            response = await self._call(
                self._dynamodb.get_item,
                name,
                TableName=self.table,
                Key={"name": {"S": name}, "version": {"S": padded_version(version)}},
                ConsistentRead=True,
            )
            item = response.get("Item")
        else:
            items = (await self._query_latest(name)).get("Items", [])
            item = items[0] if items else None
        if not item:
            suffix = f" version {version}" if version else ""
            raise SecretNotFoundError(f"secret {name!r}{suffix} not found in table {self.table!r}")
        return SealedSecret.from_item(item)

    async def _query_latest(self, name: str, projection: str | None = None) -> Any:
        extra = {"ProjectionExpression": projection} if projection else {}
        return await self._call(
            self._dynamodb.query,
            name,
            TableName=self.table,
            KeyConditionExpression="#n = :n",
            ExpressionAttributeNames={"#n": "name"},
            ExpressionAttributeValues={":n": {"S": name}},
            ScanIndexForward=False,
            ConsistentRead=True,
            Limit=1,
            **extra,
        )

    async def _decrypt_key(self, sealed: SealedSecret, context: Mapping[str, str]) -> bytes:
        try:
            response = await self._kms.decrypt(
                CiphertextBlob=sealed.wrapped_key, EncryptionContext=dict(context)
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code == "AccessDeniedException":
                # On AWS this is also what a context the instance policy does not allow gets.
                raise SecretMisconfiguredError(
                    f"secret {sealed.name!r}: KMS denied the decrypt under encryption context "
                    f"{_describe_context(context)}: check secrets.encryption_context against "
                    "the instance role's kms:EncryptionContext conditions"
                ) from None
            if code == "InvalidCiphertextException":
                raise SecretIntegrityError(
                    f"secret {sealed.name!r}: KMS refused the data key under encryption context "
                    f"{_describe_context(context)}: the item was stored with another context "
                    "(secrets.encryption_context), or it is not a CredStash item"
                ) from None
            raise _store_error(sealed.name, exc, "kms") from exc
        except (BotoCoreError, OSError) as exc:
            raise _store_error(sealed.name, exc, "kms") from exc
        await self._check_key(sealed.name, str(response.get("KeyId", "")))
        plaintext: bytes = response["Plaintext"]
        return plaintext

    async def _check_key(self, name: str, key_id: str) -> None:
        """Refuse a data key KMS reports under any other key than the CredStash key."""
        if not self.kms_key_id:
            return
        expected = await self._expected_key_arn(name)
        if key_id != expected:
            raise SecretIntegrityError(
                f"secret {name!r}: its data key is not under the CredStash key "
                f"{self.kms_key_id!r} ({expected}, secrets.kms_key_id): KMS reports {key_id!r}"
            )

    async def _expected_key_arn(self, name: str) -> str:
        # Resolved once per process: an alias retargeted later needs a restart (as a new key
        # for CredStash needs a re-encryption of every secret anyway).
        async with self._resolving:
            if self._key_arn is None:
                response = await self._call(
                    self._kms.describe_key, name, KeyId=self.kms_key_id, source="kms"
                )
                self._key_arn = str(response["KeyMetadata"]["Arn"])
            return self._key_arn

    async def _call(
        self, method: Any, name: str, *, source: str = "dynamodb", **kwargs: Any
    ) -> Any:
        """Call DynamoDB (or KMS, ``source="kms"``), raising SecretErrors as ``_store_error`` says."""
        try:
            return await method(**kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                raise SecretError(f"secret {name!r}: that version already exists") from None
            raise _store_error(name, exc, source) from exc
        except (BotoCoreError, OSError) as exc:
            raise _store_error(name, exc, source) from exc


def _is_key_arn(key_id: str) -> bool:
    return key_id.startswith("arn:") and ":key/" in key_id


def _describe_context(context: Mapping[str, str]) -> str:
    # Encryption contexts are not secret (CloudTrail logs them in the clear).
    return "{" + ", ".join(f"{k}={v}" for k, v in sorted(context.items())) + "}"


def _store_error(name: str, exc: BaseException, source: str) -> SecretError:
    """What a failed DynamoDB or KMS call raises, as the table in ``service/errors.py`` decides.

    RETRY: the store is down (the cache serves a stale value, a target backs off);
    MISCONFIGURED: IAM, a missing table or a disabled key (a target is misconfigured);
    REFUSE: a call courier built wrong, a plain SecretError.
    """
    detail = f"secret {name!r}: secret store failed ({type(exc).__name__}: {exc})"
    decision = classify(exc, source)
    if decision is RETRY:
        return SecretUnavailableError(detail)
    if decision is MISCONFIGURED:
        return SecretMisconfiguredError(detail)
    return SecretError(detail)
