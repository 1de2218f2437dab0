"""Personal fields of a decrypted event, masked for the console's eyes.

An operation names its personal fields (``PERSONAL_FIELDS`` in its module); they are masked
wherever they appear in the event. An operation that names none has every string masked:
what nobody declared safe is treated as personal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..operations import OPERATIONS

MASK = "•••"


def mask_value(value: Any) -> Any:
    """``value`` with nothing personal left: first character of a string, then a fixed mask
    (so the length is not shown either); every element of a list; numbers and the rest
    wholly."""
    if isinstance(value, str):
        return value[:1] + MASK if value else ""
    if isinstance(value, list):
        return [mask_value(item) for item in value]
    if isinstance(value, Mapping):
        return {key: mask_value(item) for key, item in value.items()}
    return MASK


def masked_event(op: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """``payload`` with the personal fields of ``op`` masked (every string, for unknown ops)."""
    personal = getattr(OPERATIONS.get(op), "PERSONAL_FIELDS", None)
    if personal is None:
        masked: dict[str, Any] = mask_value(payload)
        return masked
    return _mask_named(payload, frozenset(personal))


def _mask_named(document: Mapping[str, Any], personal: frozenset[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in document.items():
        if key in personal:
            out[key] = mask_value(value)
        elif isinstance(value, Mapping):
            out[key] = _mask_named(value, personal)
        else:
            out[key] = value
    return out
