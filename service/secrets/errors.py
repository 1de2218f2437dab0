"""What the secret store and its cache raise when a secret cannot be produced."""

from __future__ import annotations

from ..errors import CourierError, PermanentError, TransientError


class SecretError(CourierError):
    """A secret could not be produced."""


class SecretNotFoundError(SecretError, PermanentError):
    """No item with that name (and version) exists in the CredStash table."""

    reason = "secret_not_found"


class SecretIntegrityError(SecretError, PermanentError):
    """The item's HMAC does not match its ciphertext: tampered, or the wrong key/context."""

    reason = "secret_integrity"


class SecretUnavailableError(SecretError, TransientError):
    """The store (DynamoDB or KMS) failed and no usable cached value exists."""
