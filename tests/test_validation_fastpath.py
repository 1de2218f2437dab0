"""The compiled validator (fastjsonschema) that answers the common valid case, against jsonschema.

``validation_errors`` and ``event_errors`` ask the compiled validator first and jsonschema only
when it refuses, so their answers are jsonschema's exactly as long as the compiled validator
never passes what jsonschema refuses. These tests pin that: a table of tricky inputs on which
both give the same verdict, and generated documents on which the answers equal jsonschema's.
Both read a pattern's ``$`` as JSON Schema (ECMA-262) does: the end of the string, never
before a final newline.
"""

from __future__ import annotations

import copy
from typing import Any

import hypothesis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.operations import create_mailbox as cm

VALID: dict[str, Any] = {
    "username": "jane.doe",
    "display_name": "Jane Doe",
    "plan": "basic",
    "contact_email": "jane@example.com",
}

# (field, value) replacing VALID's; None as value removes the field.
TRICKY: list[tuple[str, Any]] = [
    ("msisdn", "+4512345678"),
    ("msisdn", "4512345678"),
    ("msisdn", "+0123456789"),
    ("quota_mb", 100),
    ("quota_mb", 100.0),  # an integer to JSON Schema
    ("quota_mb", 100.5),
    ("quota_mb", True),  # a boolean is no integer
    ("quota_mb", 99),
    ("quota_mb", 102401),
    ("quota_mb", 10**30),
    ("quota_mb", "500"),
    ("locale", "da-DK"),
    ("locale", "da-dk"),
    ("locale", "xx "),
    ("aliases", []),
    ("aliases", ["abc", "abc"]),
    ("aliases", ["abc", "ABC"]),
    ("aliases", ["abc", 1]),
    ("aliases", [1, True]),
    ("aliases", [["abc"], ["abc"]]),
    ("aliases", ["a" + str(i) + "xx" for i in range(11)]),
    ("aliases", "abc"),
    ("username", "ab"),
    ("username", "a" * 32),
    ("username", "a" * 33),
    ("username", "Jane"),
    ("username", "1jane"),
    ("username", "jane doe"),
    ("username", "jane\u0301"),
    ("username", "jane\n"),  # Python's ``$`` alone would pass it
    ("msisdn", "+4512345678\n"),
    ("locale", "da\n"),
    ("aliases", ["abc\n"]),
    ("contact_email", "jane@example.com\n"),
    ("display_name", ""),
    ("display_name", "x" * 128),
    ("display_name", "x" * 129),
    ("display_name", "Jane\x01"),
    ("display_name", "Jane\x7f"),
    ("display_name", "Jane\tDoe"),
    ("display_name", "Jane\ud800"),
    ("display_name", "Ja\u00f1e \U0001f600"),
    ("display_name", "\u2028"),
    ("display_name", 5),
    ("plan", "gold"),
    ("plan", "Basic"),
    ("plan", None),
    ("contact_email", "jane@example"),
    ("contact_email", "jane@@example.com"),
    ("contact_email", "ja ne@example.com"),
    ("contact_email", "jane@exa\u00a0mple.com"),  # a Unicode space: \s in Python's re
    ("contact_email", "jane@exa\x1cmple.com"),
    ("contact_email", "j\u00e9@\u00e9xample.com"),
    ("contact_email", "a@b." + "c" * 250),
    ("contact_email", "jane@example.com\x00"),
    ("extra", "x"),
]


def _fast_passes(validate: Any, document: Any) -> bool:
    return cm._passes(validate, copy.deepcopy(document))


@pytest.mark.parametrize(("field", "value"), TRICKY)
def test_both_validators_agree_on_the_request(field: str, value: Any) -> None:
    payload = {**VALID, field: value} if value is not None else dict(VALID)
    if value is None:
        del payload[field]
    slow = cm._request_errors(payload)
    assert _fast_passes(cm._request_fast, payload) is (not slow), slow
    assert cm.validation_errors(payload) == slow


@pytest.mark.parametrize(("field", "value"), TRICKY)
def test_both_validators_agree_on_the_event(field: str, value: Any) -> None:
    mailbox = {**VALID, "quota_mb": 1024, "locale": "en", field: value}
    if value is None:
        del mailbox[field]
    event = cm.event(VALID, "idm-1", "tester", "2026-01-01T00:00:00.000Z") | {"mailbox": mailbox}
    slow = cm._event_problems(event)
    assert _fast_passes(cm._event_fast, event) is (not slow), slow
    assert cm.event_errors(event) == slow


@pytest.mark.parametrize(
    "document", [None, [], "x", 1, {}, {"username": None}, {"": 1}, [VALID]], ids=repr
)
def test_both_validators_refuse_what_is_no_request(document: Any) -> None:
    assert not _fast_passes(cm._request_fast, document)
    assert not _fast_passes(cm._event_fast, document)
    assert cm.validation_errors(document) == cm._request_errors(document) != []


def test_the_compiled_validator_writes_no_defaults() -> None:
    payload = dict(VALID)
    assert cm.validation_errors(payload) == []
    assert payload == VALID  # "locale" has a default in the schema: it must not appear


def test_a_trailing_newline_is_refused_in_words() -> None:
    payload = {**VALID, "username": "jane\n"}
    assert cm.validation_errors(payload) == [
        {"pointer": "/username", "message": "'jane\\n' does not match '^[a-z][a-z0-9._-]{2,31}$'"}
    ]


@pytest.mark.parametrize(
    ("pattern", "matches", "refuses"),
    [
        ("^a$", "a", "a\n"),
        ("^a\\$$", "a$", "a$\n"),  # an escaped $ is a dollar sign
        ("^[$a]+$", "a$", "a$\n"),  # so is one in a character class
        ("^[\\]$]+$", "]$", "]$\n"),  # an escaped ] does not end the class
        ("^[]$]+$", "]$", "]$\n"),  # nor does one first in the class
        ("^[^]$]+$", "ab", "a$"),  # or first after its ^
        ("^(a|b$)c?$", "b", "b\n"),
    ],
)
def test_a_pattern_reads_dollar_as_ecma_262_does(pattern: str, matches: str, refuses: str) -> None:
    assert cm._ecma_pattern(pattern).search(matches)
    assert not cm._ecma_pattern(pattern).search(refuses)


SETTINGS = hypothesis.settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)
_text = st.text(
    st.characters(codec="utf-8", categories=["L", "N", "P", "S", "Z", "Cc"])
    | st.sampled_from("@.\n"),
    max_size=40,
)
_values = st.one_of(
    _text,
    st.sampled_from(["basic", "premium", "jane.doe", "j@x.io", "+4512345678", "da-DK"]),
    st.integers(min_value=-5, max_value=200000),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.lists(_text | st.sampled_from(["abc", "abd"]), max_size=12),
)
_payloads = st.dictionaries(
    st.sampled_from([*cm.REQUEST_SCHEMA["properties"], "other"]), _values, max_size=9
).map(lambda drawn: {**VALID, **drawn})


@SETTINGS
@given(payload=_payloads)
def test_the_answer_is_jsonschemas_on_generated_requests(payload: dict[str, Any]) -> None:
    slow = cm._request_errors(payload)
    assert _fast_passes(cm._request_fast, payload) is (not slow), slow
    assert cm.validation_errors(payload) == slow


@SETTINGS
@given(mailbox=_payloads, identity=_values)
def test_the_answer_is_jsonschemas_on_generated_events(
    mailbox: dict[str, Any], identity: Any
) -> None:
    event = {"mailbox": mailbox, "identity_id": identity, "requested_by": "t", "requested_at": "x"}
    slow = cm._event_problems(event)
    if _fast_passes(cm._event_fast, event):
        assert slow == []
    assert cm.event_errors(event) == slow
