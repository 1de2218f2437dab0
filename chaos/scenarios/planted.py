"""Messages put straight on the work queue, past the API: sealed as courier seals them, or poison
of one of six kinds (the poison scenario; the AWS scenario plants healthy ones during a cut)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import uuid
from collections.abc import Sequence

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from chaos import verify
from chaos.load import body
from chaos.rig import Rig
from courier_testkit.aws import plain_client
from service.bootstrap import Resources
from service.envelope import ENCRYPTION_CONTEXT, Envelope, EnvelopeCipher, header_aad
from service.operations import create_mailbox
from service.settings import EnvelopeSettings
from service.status import now_iso

POISON_KINDS = (
    ("not-json", "malformed"),
    ("undecryptable", "undecryptable"),
    ("bad-version", "unsupported_version"),
    ("unknown-op", "unknown_op"),
    ("invalid-payload", "invalid_payload"),
    ("target-400", "target_rejected"),
)
"""(kind, the DLQ reason courier must give it)."""


async def sealed_messages(
    rig: Rig, resources: Resources, run: str, count: int, poison_every: int
) -> tuple[list[tuple[str, str, str]], dict[str, str]]:
    """(request id, body, kind) for ``count`` messages, every ``poison_every``-th one poison;
    and the expected DLQ reason per poison request id."""
    direct = rig.stack.direct
    async with plain_client("kms", direct) as kms:
        cipher = EnvelopeCipher(kms, EnvelopeSettings(kms_key_id=resources.data_key_arn))
        generated = await kms.generate_data_key(
            KeyId=resources.data_key_arn,
            KeySpec="AES_256",
            EncryptionContext=dict(ENCRYPTION_CONTEXT),
        )
        aead = AESGCM(generated["Plaintext"])
        messages: list[tuple[str, str, str]] = []
        expected: dict[str, str] = {}
        requested_at = now_iso()
        poison_seen = 0
        for index in range(count):
            request_id = uuid.uuid4().hex
            poison = poison_every and index % poison_every == poison_every - 1
            kind, reason = (
                POISON_KINDS[poison_seen % len(POISON_KINDS)] if poison else ("healthy", "")
            )
            poison_seen += int(bool(poison))
            mailbox = body(run, index, poison=kind == "target-400")
            event = create_mailbox.event(mailbox, f"idm-{index}", "chaos", requested_at)
            if kind in ("healthy", "target-400"):
                text = await cipher.seal(create_mailbox.NAME, request_id, event)
            elif kind == "not-json":
                text = "not an envelope " + request_id
            elif kind == "undecryptable":
                document = json.loads(await cipher.seal(create_mailbox.NAME, request_id, event))
                document["key"]["ek"] = base64.b64encode(os.urandom(184)).decode()
                text = json.dumps(document)
            elif kind == "bad-version":
                document = json.loads(await cipher.seal(create_mailbox.NAME, request_id, event))
                text = json.dumps({**document, "v": 2})
            else:
                op = "delete-everything" if kind == "unknown-op" else create_mailbox.NAME
                payload = (
                    {"everything": True} if kind == "unknown-op" else {"mailbox": {"username": 1}}
                )
                nonce = os.urandom(12)
                ciphertext = aead.encrypt(
                    nonce, json.dumps(payload).encode(), header_aad(1, op, request_id)
                )
                text = Envelope(
                    op,
                    request_id,
                    str(generated["KeyId"]),
                    bytes(generated["CiphertextBlob"]),
                    nonce,
                    ciphertext,
                ).serialize()
            messages.append((request_id, text, kind))
            if reason:
                expected[request_id] = reason
    return messages, expected


async def preload(rig: Rig, queue_url: str, messages: Sequence[tuple[str, str, str]]) -> None:
    """Send ``messages`` (request id, body, kind) to the queue directly, 10 a batch."""
    url = verify.direct_url(rig, queue_url)
    limit = asyncio.Semaphore(16)
    async with plain_client("sqs", rig.stack.direct) as sqs:

        async def send(batch: Sequence[tuple[str, str, str]]) -> None:
            entries = [
                {
                    "Id": str(i),
                    "MessageBody": text,
                    "MessageAttributes": {
                        "op": {"DataType": "String", "StringValue": create_mailbox.NAME},
                        "request_id": {"DataType": "String", "StringValue": request_id},
                    },
                }
                for i, (request_id, text, _) in enumerate(batch)
            ]
            async with limit:
                response = await sqs.send_message_batch(QueueUrl=url, Entries=entries)
            assert not response.get("Failed"), response["Failed"][:2]

        await asyncio.gather(*(send(messages[i : i + 10]) for i in range(0, len(messages), 10)))
