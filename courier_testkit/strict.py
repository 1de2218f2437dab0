"""The strict layer's HTTP side: decode an AWS request, judge it, record it, shape the answer.

Both adapters use it: ``StrictWsgi`` (below) wraps moto's WSGI app for the test-suite, and
``courier_testkit/proxy.py`` (aiohttp) stands in front of fauxqs, dynalite and moto for bench and chaos.
The rules themselves are in ``courier_testkit.aws_limits``.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

from .aws_limits import AwsRefusal, check, decode_query, failed_entries

# X-Amz-Target prefixes of the JSON protocols -> IAM service prefix.
TARGET_SERVICES = {
    "AmazonSQS": "sqs",
    "DynamoDB_20120810": "dynamodb",
    "DynamoDBStreams_20120810": "dynamodb",
    "TrentService": "kms",
}
_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/[^/]*/[^/]*/([^/]+)/")


@dataclass(frozen=True)
class AwsCall:
    """One AWS request as IAM sees it: who (access key id), what action, on which resources.

    ``resources`` are as the request names them: SQS queue URLs (or the queue name for
    CreateQueue/GetQueueUrl), DynamoDB table names, KMS key ids, ARNs or aliases. A KMS
    Decrypt without ``KeyId`` names none (the key is inside the ciphertext).
    """

    access_key: str
    service: str
    operation: str
    resources: tuple[str, ...] = ()

    @property
    def action(self) -> str:
        """The IAM action, e.g. ``sqs:SendMessage``."""
        return f"{self.service}:{self.operation}"


@dataclass(frozen=True)
class MessageEvent:
    """What one successful SQS call did to one message (the recorder's message ledger)."""

    access_key: str
    event: str  # "received", "deleted" or "visibility"
    receipt_handle: str
    message_id: str = ""  # "received" only
    visibility_timeout: int = -1  # "visibility" only
    at: float = 0.0  # time.monotonic() when the answer passed the layer


class ActionRecorder:
    """Every AWS call the layer saw, and every refusal it answered; thread-safe.

    With ``ledger`` on it also keeps a message ledger (``record_messages``): which SQS
    messages each access key received, deleted or changed the visibility of. Off by default:
    parsing every ReceiveMessage answer costs the layer CPU a benchmark should not pay.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: Counter[AwsCall] = Counter()
        self._refused: list[tuple[AwsCall, AwsRefusal]] = []
        self.ledger = False
        self._events: list[MessageEvent] = []

    def record(self, call: AwsCall, refusal: AwsRefusal | None = None) -> None:
        """Count ``call``; with ``refusal`` when the layer refused it (entirely or an entry)."""
        with self._lock:
            self._calls[call] += 1
            if refusal is not None:
                self._refused.append((call, refusal))

    def calls(self) -> dict[AwsCall, int]:
        """Every distinct call so far and how many times it was made."""
        with self._lock:
            return dict(self._calls)

    def actions(self, access_key: str | None = None) -> set[str]:
        """IAM actions called (by ``access_key`` only, when given)."""
        return {
            call.action
            for call in self.calls()
            if access_key is None or call.access_key == access_key
        }

    def refusals(self) -> list[tuple[AwsCall, AwsRefusal]]:
        """The calls the layer refused, in order, with what it answered."""
        with self._lock:
            return list(self._refused)

    def record_messages(self, events: Iterable[MessageEvent]) -> None:
        """Add ``events`` to the message ledger."""
        with self._lock:
            self._events.extend(events)

    def message_events(self) -> list[MessageEvent]:
        """The message ledger so far, in the order the answers passed."""
        with self._lock:
            return list(self._events)

    def clear(self) -> None:
        """Forget everything recorded so far (the ledger stays on or off)."""
        with self._lock:
            self._calls.clear()
            self._refused.clear()
            self._events.clear()

    def as_json(self) -> dict[str, Any]:
        """``{"by_access_key": {key: {action: n}}, "calls": [...], "refused": [...]}``."""
        by_key: dict[str, Counter[str]] = {}
        calls = []
        for call, count in self.calls().items():
            by_key.setdefault(call.access_key, Counter())[call.action] += count
            calls.append(
                {
                    "access_key": call.access_key,
                    "action": call.action,
                    "resources": list(call.resources),
                    "count": count,
                }
            )
        refused = [
            {"access_key": c.access_key, "action": c.action, "code": r.code, "message": r.message}
            for c, r in self.refusals()
        ]
        by_access_key = {key: dict(counter) for key, counter in by_key.items()}
        messages = [asdict(event) for event in self.message_events()]
        return {
            "by_access_key": by_access_key,
            "calls": calls,
            "refused": refused,
            "messages": messages,
        }


@dataclass
class Inspection:
    """What the layer made of one request, and what to do with it."""

    call: AwsCall | None
    protocol: str  # "json", "query", or "" when the request is not an AWS API call
    refusal: AwsRefusal | None = None
    failed: dict[str, AwsRefusal] = field(default_factory=dict)
    request: dict[str, Any] = field(default_factory=dict)

    def reply(self) -> tuple[int, dict[str, str], bytes] | None:
        """The answer to give without forwarding, or None to forward."""
        if self.refusal is not None:
            if self.protocol == "query":
                return self.refusal.query_response()
            return self.refusal.json_response()
        entries = self.request.get("Entries") or []
        if self.failed and len(self.failed) == len(entries):
            document = {"Successful": [], "Failed": self._failed_list()}
            headers = {"Content-Type": "application/x-amz-json-1.0"}
            return 200, headers, json.dumps(document).encode()
        return None

    def forward_body(self, body: bytes) -> bytes:
        """The body to forward: unchanged, or without the batch entries AWS would fail.

        A rewritten body no longer matches its SigV4 signature; neither fauxqs nor moto's SQS
        checks signatures, so only a verifying upstream would notice.
        """
        if not self.failed:
            return body
        kept = [e for e in self.request["Entries"] if str(e.get("Id", "")) not in self.failed]
        return json.dumps({**self.request, "Entries": kept}).encode()

    def merge(self, status: int, body: bytes) -> bytes:
        """The upstream's answer with the entries the layer failed added to ``Failed``."""
        if not self.failed or status != 200:
            return body
        try:
            document = json.loads(body)
        except ValueError:
            return body
        document["Failed"] = [*(document.get("Failed") or []), *self._failed_list()]
        return json.dumps(document).encode()

    def _failed_list(self) -> list[dict[str, Any]]:
        return [refusal.failed_entry(entry_id) for entry_id, refusal in self.failed.items()]


def _resources(service: str, request: Mapping[str, Any]) -> tuple[str, ...]:
    names = {
        "sqs": ("QueueUrl", "QueueName"),
        "dynamodb": ("TableName",),
        "kms": ("KeyId", "TargetKeyId", "AliasName", "DestinationKeyId", "SourceKeyId"),
    }.get(service, ())
    found = [str(request[name]) for name in names if request.get(name)]
    found += [str(table) for table in request.get("RequestItems") or {}]
    found += [
        str(op.get("TableName"))
        for item in request.get("TransactItems") or []
        for op in item.values()
        if isinstance(op, dict) and op.get("TableName")
    ]
    return tuple(found)


def _decode(
    headers: Mapping[str, str], body: bytes, query_string: str
) -> tuple[str, str, str, dict[str, Any]]:
    """(protocol, service, operation, request); protocol "" when not an AWS API call."""
    lowered = {k.lower(): v for k, v in headers.items()}
    found = _CREDENTIAL.search(lowered.get("authorization", ""))
    scope_service = found[2] if found else ""
    target = lowered.get("x-amz-target", "")
    if target:
        prefix, _, operation = target.rpartition(".")
        service = TARGET_SERVICES.get(prefix, scope_service or prefix)
        try:
            request = json.loads(body) if body else {}
        except ValueError:
            request = {}
        return "json", service, operation, request if isinstance(request, dict) else {}
    form = body.decode(errors="replace") if body else query_string
    params = dict(parse_qsl(form, keep_blank_values=True))
    if "Action" not in params:
        params.update(parse_qsl(query_string, keep_blank_values=True))
    if "Action" not in params:
        return "", scope_service, "", {}
    return "query", scope_service or "sqs", params["Action"], decode_query(params)


def access_key_of(headers: Mapping[str, str]) -> str:
    """The access key id of a SigV4 ``Authorization`` header, or "" when unsigned."""
    lowered = {k.lower(): v for k, v in headers.items()}
    found = _CREDENTIAL.search(lowered.get("authorization", ""))
    return found[1] if found else ""


def inspect(
    headers: Mapping[str, str], body: bytes, query_string: str = "", *, enforce: bool = True
) -> Inspection:
    """Decode and judge one request (``enforce=False``: decode and record only)."""
    protocol, service, operation, request = _decode(headers, body, query_string)
    if not protocol:
        return Inspection(None, "")
    call = AwsCall(access_key_of(headers), service, operation, _resources(service, request))
    found = Inspection(call, protocol, request=request)
    if enforce:
        found.refusal = check(service, operation, request)
        if found.refusal is None:
            found.failed = failed_entries(service, operation, request)
        if found.failed and protocol == "query":
            # Rewriting a query-protocol batch is not worth it: refuse it whole instead.
            found.refusal, found.failed = next(iter(found.failed.values())), {}
    return found


def record(recorder: ActionRecorder | None, found: Inspection) -> None:
    """Put ``found`` in ``recorder`` (with its refusal or first failed entry, if any)."""
    if recorder is None or found.call is None:
        return
    refusal = found.refusal or next(iter(found.failed.values()), None)
    recorder.record(found.call, refusal)


_SETTLING = {
    "DeleteMessage": "deleted",
    "DeleteMessageBatch": "deleted",
    "ChangeMessageVisibility": "visibility",
    "ChangeMessageVisibilityBatch": "visibility",
}


def record_messages(
    recorder: ActionRecorder | None, found: Inspection, status: int, body: bytes
) -> None:
    """With ``recorder.ledger`` on, note the messages a successful SQS call (JSON protocol)
    received, deleted or changed the visibility of; ``body`` is the answer the client gets."""
    if recorder is None or not recorder.ledger or found.call is None or status != 200:
        return
    if found.call.service != "sqs" or found.protocol != "json":
        return
    recorder.record_messages(message_events(found.call, found.request, body))


def message_events(call: AwsCall, request: Mapping[str, Any], body: bytes) -> list[MessageEvent]:
    """The ledger entries of one successful SQS call: its request and its answer's ``body``."""
    try:
        answer = json.loads(body) if body else {}
    except ValueError:
        answer = {}
    now = time.monotonic()
    if call.operation == "ReceiveMessage":
        return [
            MessageEvent(
                call.access_key,
                "received",
                str(m.get("ReceiptHandle", "")),
                message_id=str(m.get("MessageId", "")),
                at=now,
            )
            for m in answer.get("Messages") or []
        ]
    kind = _SETTLING.get(call.operation)
    if kind is None:
        return []
    entries: list[Mapping[str, Any]] = [request]
    if call.operation.endswith("Batch"):  # only the entries the answer lists as done
        done = {str(entry.get("Id")) for entry in answer.get("Successful") or []}
        entries = [e for e in request.get("Entries") or [] if str(e.get("Id")) in done]
    return [
        MessageEvent(
            call.access_key,
            kind,
            str(entry.get("ReceiptHandle", "")),
            visibility_timeout=int(entry.get("VisibilityTimeout", -1))
            if kind == "visibility"
            else -1,
            at=now,
        )
        for entry in entries
    ]


# -- WSGI adapter (moto server) ---------------------------------------------------------------

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class StrictWsgi:
    """WSGI middleware: refuses what AWS refuses before ``app`` (moto) sees it, records calls.

    ``enforce=False`` records without refusing.
    """

    def __init__(
        self, app: WsgiApp, recorder: ActionRecorder | None = None, *, enforce: bool = True
    ) -> None:
        self.app = app
        self.recorder = recorder
        self.enforce = enforce

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        body = _read_body(environ)
        headers = {
            key[5:].replace("_", "-"): value
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        if environ.get("CONTENT_TYPE"):
            headers["Content-Type"] = environ["CONTENT_TYPE"]
        found = inspect(headers, body, environ.get("QUERY_STRING", ""), enforce=self.enforce)
        record(self.recorder, found)
        reply = found.reply()
        if reply is not None:
            return _respond(start_response, *reply)
        forwarded = found.forward_body(body)
        environ["wsgi.input"] = io.BytesIO(forwarded)
        environ["CONTENT_LENGTH"] = str(len(forwarded))
        if not found.failed:
            return self.app(environ, start_response)
        return self._merged(environ, start_response, found)

    def _merged(
        self, environ: dict[str, Any], start_response: Callable[..., Any], found: Inspection
    ) -> Iterable[bytes]:
        captured: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            captured.update(status=status, headers=headers)
            return lambda _data: None

        result = self.app(environ, capture)
        try:
            payload = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        status = int(captured["status"].split(" ", 1)[0])
        headers = {k: v for k, v in captured["headers"] if k.lower() != "content-length"}
        return _respond(start_response, status, headers, found.merge(status, payload))


def _read_body(environ: dict[str, Any]) -> bytes:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    stream = environ["wsgi.input"]
    body: bytes = stream.read(length) if length else b""
    return body


def _respond(
    start_response: Callable[..., Any], status: int, headers: Mapping[str, str], body: bytes
) -> list[bytes]:
    reason = HTTPStatus(status).phrase
    start_response(f"{status} {reason}", [*headers.items(), ("Content-Length", str(len(body)))])
    return [body]
