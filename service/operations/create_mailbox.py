"""create-mailbox: the request schema, the synchronous IdM step's input, and the queued event."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from xml.sax.saxutils import escape

import fastjsonschema
from jsonschema import Draft202012Validator, FormatChecker, ValidationError, validators

NAME = "create-mailbox"

# Printable text only: no C0/DEL control characters, no unpaired UTF-16 surrogates.
TEXT_PATTERN = "^[^\\x00-\\x1f\\x7f\\ud800-\\udfff]*$"

REQUEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "CreateMailboxRequest",
    "type": "object",
    "additionalProperties": False,
    "required": ["username", "display_name", "plan", "contact_email"],
    "properties": {
        "username": {
            "type": "string",
            "pattern": "^[a-z][a-z0-9._-]{2,31}$",
            "description": "Local part of the new mailbox address; lower case, 3 to 32 characters.",
            "examples": ["jane.doe"],
        },
        "display_name": {
            "type": "string",
            "minLength": 1,
            "maxLength": 128,
            "pattern": TEXT_PATTERN,
            "description": "Printable text: no control characters or lone surrogates (SOAP needs well-formed XML).",
            "examples": ["Jane Doe"],
        },
        "plan": {"type": "string", "enum": ["basic", "standard", "premium"]},
        "contact_email": {
            "type": "string",
            "format": "email",
            "maxLength": 254,
            "pattern": "^[^@\\s]+@[^@\\s]+\\.[^@\\s]+$",
            "allOf": [{"pattern": TEXT_PATTERN}],
            "description": "Existing address for notifications about the new mailbox.",
        },
        "msisdn": {
            "type": "string",
            "pattern": "^\\+[1-9][0-9]{6,14}$",
            "description": "Subscriber number in E.164 form.",
        },
        "quota_mb": {"type": "integer", "minimum": 100, "maximum": 102400},
        "locale": {"type": "string", "pattern": "^[a-z]{2}(-[A-Z]{2})?$", "default": "en"},
        "aliases": {
            "type": "array",
            "maxItems": 10,
            "uniqueItems": True,
            "items": {"type": "string", "pattern": "^[a-z][a-z0-9._-]{2,31}$"},
        },
    },
}

DEFAULT_QUOTA_MB = {"basic": 1024, "standard": 10240, "premium": 51200}
# Members of the event's ``mailbox`` that identify a person: the operator console masks them
# in a decrypted event unless the operator holds the unmask scope.
PERSONAL_FIELDS = ("username", "display_name", "contact_email", "msisdn", "aliases")


@functools.cache
def _ecma_pattern(pattern: str) -> re.Pattern[str]:
    r"""``pattern`` with ``$`` as JSON Schema (ECMA-262) means it: the end of the string.

    Python's ``$`` also matches before a final newline, so ``^[a-z]+$`` would let
    ``"jane\n"`` through to the IdM and the legacy systems. Every unescaped ``$`` outside a
    character class becomes ``\Z``. Only ``$`` is translated: the schema's other escapes
    (``\s`` in ``contact_email``, which in Python omits a few Unicode spaces ECMA includes)
    keep Python's meaning, and ``format: email`` and the printable-text pattern refuse more.
    """
    translated: list[str] = []
    escaped = in_class = False
    class_start = -1  # where the current class's members begin: a "]" there is a member
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif in_class:
            if char == "^" and len(translated) == class_start:
                class_start += 1
            elif char == "]" and len(translated) > class_start:
                in_class = False
        elif char == "[":
            in_class, class_start = True, len(translated) + 1
        elif char == "$":
            translated.append("\\Z")
            continue
        translated.append(char)
    return re.compile("".join(translated))


def _pattern(
    validator: Any, pattern: str, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _ecma_pattern(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


# jsonschema words every error; its ``pattern`` keyword is given ECMA-262's ``$``.
_Validator = validators.extend(Draft202012Validator, {"pattern": _pattern})

_validator = _Validator(REQUEST_SCHEMA, format_checker=FormatChecker())


def _compiled(schema: dict[str, Any]) -> Callable[[Any], Any]:
    """A compiled validator (fastjsonschema: about 15x cheaper than jsonschema on valid input)
    for the common case; jsonschema stays the authority that words every error.

    It must never pass what jsonschema refuses (it may refuse more: a caller then asks
    jsonschema, whose verdict stands). Its ``format: email`` is jsonschema's own check ("@" in
    the string); its patterns read ``$`` as ``\\Z``, as ``_ecma_pattern`` does;
    ``use_default=False`` so it never writes defaults into the payload.
    """
    return fastjsonschema.compile(
        schema,
        formats={"email": lambda value: "@" in value},
        use_default=False,
        detailed_exceptions=False,
    )


def _passes(validate: Callable[[Any], Any], document: Any) -> bool:
    try:
        validate(document)
    except Exception:  # refused, or anything unexpected: jsonschema decides
        return False
    return True


_request_fast = _compiled(REQUEST_SCHEMA)


def validation_errors(payload: Any) -> list[dict[str, str]]:
    """Every schema violation of ``payload`` as ``{"pointer", "message"}``, in document order."""
    if _passes(_request_fast, payload):
        return []
    return _request_errors(payload)


def _request_errors(payload: Any) -> list[dict[str, str]]:
    errors = sorted(_validator.iter_errors(payload), key=lambda e: list(map(str, e.path)))
    return [
        {
            "pointer": _pointer(error.path),
            "message": _message(error.message),
        }
        for error in errors
    ]


def _pointer(path: Iterable[Any]) -> str:
    # RFC 6901: the whole document is "", not "/" (which names the member with an empty key).
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)


def _message(text: str) -> str:
    # jsonschema quotes the offending value; cap it so a huge value is not echoed back whole.
    return text if len(text) <= 200 else text[:197] + "..."


def identity_request(payload: Mapping[str, Any]) -> dict[str, Any]:
    """What the IdM needs to create the identity."""
    return {
        "username": payload["username"],
        "display_name": payload["display_name"],
        "email": payload["contact_email"],
        "locale": payload.get("locale", "en"),
    }


def event(
    payload: Mapping[str, Any], identity_id: str, subject: str, requested_at: str
) -> dict[str, Any]:
    """The event queued for the legacy systems (encrypted before it leaves the process)."""
    return {
        "mailbox": {
            **payload,
            "quota_mb": payload.get("quota_mb", DEFAULT_QUOTA_MB[payload["plan"]]),
            "locale": payload.get("locale", "en"),
        },
        "identity_id": identity_id,
        "requested_by": subject,
        "requested_at": requested_at,
    }


def group_id(payload: Mapping[str, Any]) -> str:
    """FIFO message group: events of one subscriber stay in order."""
    return str(payload["username"])


EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["mailbox", "identity_id", "requested_by", "requested_at"],
    "properties": {
        "mailbox": {
            # Without "$schema": jsonschema would validate a subschema naming its dialect with
            # that dialect's stock class, and lose ``_Validator``'s pattern keyword.
            **{key: value for key, value in REQUEST_SCHEMA.items() if key != "$schema"},
            "required": [*REQUEST_SCHEMA["required"], "quota_mb", "locale"],
        },
        "identity_id": {"type": "string", "minLength": 1},
        "requested_by": {"type": "string"},
        "requested_at": {"type": "string"},
    },
}
_event_validator = _Validator(EVENT_SCHEMA, format_checker=FormatChecker())
_event_fast = _compiled(EVENT_SCHEMA)


def event_errors(event_payload: Any) -> list[str]:
    """Why a decrypted event cannot be delivered (empty when it can)."""
    if _passes(_event_fast, event_payload):
        return []
    return _event_problems(event_payload)


def _event_problems(event_payload: Any) -> list[str]:
    # Where and which rule, never the message: jsonschema quotes the offending (personal) value,
    # and this text ends up in DLQ attributes.
    return [
        f"/{'/'.join(map(str, error.absolute_path))}: fails {error.validator!r}"
        for error in _event_validator.iter_errors(event_payload)
    ]


# One encoder, as ``json.dumps(..., separators=(",", ":"))`` would build one per call.
_compact_json = json.JSONEncoder(separators=(",", ":")).encode


def render(
    target_format: str, request_id: str, event_payload: Mapping[str, Any]
) -> tuple[bytes, str]:
    """The body and content type a legacy target of ``target_format`` (json | soap) expects."""
    if target_format == "soap":
        return _soap(request_id, event_payload), "text/xml; charset=utf-8"
    document = {
        "requestId": request_id,
        "identityId": event_payload["identity_id"],
        "mailbox": event_payload["mailbox"],
        "requestedAt": event_payload["requested_at"],
    }
    return _compact_json(document).encode(), "application/json"


def _soap(request_id: str, event_payload: Mapping[str, Any]) -> bytes:
    mailbox = event_payload["mailbox"]
    fields = {
        "RequestId": request_id,
        "IdentityId": event_payload["identity_id"],
        "Username": mailbox["username"],
        "DisplayName": mailbox["display_name"],
        "Plan": mailbox["plan"],
        "QuotaMb": str(mailbox["quota_mb"]),
        "ContactEmail": mailbox["contact_email"],
        "Locale": mailbox["locale"],
    }
    body = "".join(f"<{name}>{escape(value)}</{name}>" for name, value in fields.items())
    return (
        '<?xml version="1.0" encoding="utf-8"?>'
        '<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body>'
        f'<CreateMailbox xmlns="urn:telco:legacy:mailbox">{body}</CreateMailbox>'
        "</soap:Body></soap:Envelope>"
    ).encode()
