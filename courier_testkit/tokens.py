"""Bearer tokens for tests, bench and chaos: ``courier token``'s own minter, with overrides."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jwt

from service.api.auth import issue_token
from service.settings import AuthSettings

DEFAULT_SCOPES = ("mailbox:create", "mailbox:read")


def mint_token(
    key: str,
    auth: AuthSettings | None = None,
    *,
    subject: str = "tester",
    scopes: str | Sequence[str] = DEFAULT_SCOPES,
    lifetime_seconds: int = 3600,
    **overrides: Any,
) -> str:
    """An HS256 token signed with ``key`` for ``auth``'s issuer and audience (default settings'
    when None: courier's defaults, never a config file), made by ``service.api.auth.issue_token`` (what ``courier token`` prints).

    ``scopes`` is a list or a space-separated string. ``overrides`` replace claims; a value of
    None removes the claim (a token without ``exp``, say).
    """
    settings = auth if auth is not None else AuthSettings()
    wanted = scopes.split() if isinstance(scopes, str) else list(scopes)
    token = issue_token(key, settings, subject, wanted, lifetime_seconds)
    if not overrides:
        return token
    claims = jwt.decode(token, options={"verify_signature": False})
    claims.update(overrides)
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, key, algorithm="HS256")
