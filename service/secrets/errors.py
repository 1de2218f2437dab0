"""What the secret store and its cache raise when a secret cannot be produced."""

from __future__ import annotations

from ..errors import CourierError, MisconfiguredError, PermanentError, TransientError


class SecretError(CourierError):
    """A secret could not be produced.

    Raised as is when the store refused a call courier built wrong; its subclasses say more.
    Which one a store failure becomes is decided by the table in ``service/errors.py``.
    """


class SecretNotFoundError(SecretError, PermanentError):
    """No item with that name (and version) exists in the CredStash table."""

    reason = "secret_not_found"


class SecretIntegrityError(SecretError, PermanentError):
    """The item's HMAC does not match its ciphertext: tampered, or the wrong key/context."""

    reason = "secret_integrity"


class SecretUnavailableError(SecretError, TransientError):
    """The store (DynamoDB or KMS) failed and no usable cached value exists."""


class SecretMisconfiguredError(SecretError, MisconfiguredError):
    """The deployment refuses the read: IAM (a policy condition, an encryption context the
    role may not use), a missing table, a disabled key.

    Neither an outage nor the secret's fault: a target whose secret fails so is misconfigured
    (``TargetMisconfiguredError``); the cache serves a cached value within its staleness bound,
    as it does for any failure that is not a PermanentError.
    """
