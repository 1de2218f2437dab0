"""The sealing data key is renewed on a timer, against KMS in moto over HTTP (real clock).

A data key lives ``data_key_max_age_seconds`` and is renewed 10% of that before it expires, so a
seal after an idle longer than the lifetime finds a key and sends no GenerateDataKey.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from service.aws import AwsClients, client_config
from service.bootstrap import Resources
from service.envelope import Envelope, EnvelopeCipher
from service.errors import TransientError
from service.settings import AwsSettings, EnvelopeSettings
from tests.test_envelope import PAYLOAD, KmsCalls, data_key_events, new_id
from tests.test_secrets import Outage


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def sealed_key(cipher: EnvelopeCipher) -> bytes:
    """Seal one message; the encrypted data key it was sealed under."""
    return Envelope.parse(await cipher.seal("create-mailbox", new_id(), PAYLOAD)).encrypted_key


@pytest.fixture
def short_lived(resources: Resources) -> EnvelopeSettings:
    # Lifetime 1 s: renewed 0.9 s after each generation.
    return EnvelopeSettings(kms_key_id=resources.data_key_arn, data_key_max_age_seconds=1)


@pytest.fixture
async def outage() -> AsyncIterator[tuple[Outage, object]]:
    """A moto endpoint of our own that can be stopped, and a KMS client on it (one attempt)."""
    outage = Outage()
    config = client_config(
        AwsSettings(
            region="us-east-1",
            endpoint_url=outage.endpoint_url,
            connect_timeout_seconds=0.2,
            read_timeout_seconds=1,
        )
    ).merge(AioConfig(retries={"mode": "standard", "total_max_attempts": 1}))
    try:
        async with get_session().create_client(
            "kms", region_name="us-east-1", endpoint_url=outage.endpoint_url, config=config
        ) as kms:
            yield outage, kms
    finally:
        if outage.running:
            outage.server.stop()


async def test_a_seal_after_an_idle_longer_than_the_key_lifetime_calls_no_kms(
    aws: AwsClients, short_lived: EnvelopeSettings
) -> None:
    cipher = EnvelopeCipher(aws.kms, short_lived)
    first = await sealed_key(cipher)
    generated = data_key_events("generated")
    await asyncio.sleep(2.2)  # nothing sealed; renewals were due at 0.9 and 1.8 s
    assert data_key_events("generated") - generated == 2
    calls = KmsCalls()
    after_idle = await asyncio.wait_for(sealed_key(cipher), 1)
    assert calls.total == 0, "the seal found a renewed key"
    assert after_idle != first

    await cipher.aclose()
    await asyncio.sleep(1.2)  # past the next renewal that was due: none is left to fire
    assert calls.total == 0
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "envelope-data-key-renewal"]


async def test_a_cipher_dropped_without_aclose_stops_renewing(
    aws: AwsClients, short_lived: EnvelopeSettings
) -> None:
    cipher = EnvelopeCipher(aws.kms, short_lived)
    await sealed_key(cipher)
    generated = data_key_events("generated")
    await eventually(lambda: data_key_events("generated") - generated == 1)  # renewed at 0.9 s
    del cipher
    gc.collect()
    calls = KmsCalls()
    await asyncio.sleep(1.2)
    assert calls.total == 0


async def test_a_failed_renewal_keeps_the_key_and_retries_with_backoff(
    outage: tuple[Outage, object],
    resources: Resources,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, kms = outage
    # Lifetime 3 s: renewal due at 2.7 s; retries from 30 ms, doubling up to 300 ms.
    settings = EnvelopeSettings(kms_key_id=resources.data_key_arn, data_key_max_age_seconds=3)
    cipher = EnvelopeCipher(kms, settings)
    try:
        first = await sealed_key(cipher)
        server.begin()
        with caplog.at_level(logging.WARNING, logger="courier.envelope"):
            await eventually(lambda: "renewing the envelope data key failed" in caplog.text)
            assert await sealed_key(cipher) == first  # the current key still seals
            await asyncio.sleep(1.5)  # the key expired at 3 s: a seal now needs KMS
            with pytest.raises(TransientError):
                await cipher.seal("create-mailbox", new_id(), PAYLOAD)
        failures = [r for r in caplog.records if r.name == "courier.envelope"]
        # Backed off: a dozen retries or so in 1.5 s, not one per event-loop turn.
        assert 4 <= len(failures) <= 30, len(failures)
        assert failures[-1].fields["retry_in_seconds"] >= 0.1  # type: ignore[attr-defined]

        generated = data_key_events("generated")
        server.end()
        await eventually(lambda: data_key_events("generated") - generated == 1)
        calls = KmsCalls()
        assert await sealed_key(cipher) != first
        assert calls.total == 0
    finally:
        await cipher.aclose()
