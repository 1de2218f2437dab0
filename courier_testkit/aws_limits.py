"""The limits real SQS, DynamoDB and KMS enforce and the emulators (moto, fauxqs) do not.

Pure functions: no I/O, no HTTP. A request is the decoded parameters of one AWS operation, in
the shape of the JSON protocols (``{"QueueUrl": ..., "MessageAttributes": {name: {...}}}``);
``decode_query`` turns an SQS query-protocol form into that shape. ``check`` answers whether
AWS refuses the whole request; ``failed_entries`` which entries of a batch AWS fails one by
one (in ``Failed``, with HTTP 200) while it accepts the others.

Sizes are counted as AWS documents them:

- an SQS message is its body (UTF-8) plus, for each message attribute, its name, its data
  type and its value (UTF-8 string, or the decoded bytes of a binary value);
- a DynamoDB item is the sum of its attribute names (UTF-8) and values: strings in UTF-8,
  binaries decoded, numbers 1 byte per 2 significant digits + 1, booleans and nulls 1 byte,
  lists and maps 3 bytes + 1 byte per element + their elements (and a map's keys).

``UpdateItem`` is judged on an approximation: the resulting item is not known without the
stored one, so its size is taken as the key plus every value and name the update writes
(``ExpressionAttributeValues``/``Names``, ``AttributeUpdates``). It refuses an update whose
new values alone exceed 400 KB, not one that grows a stored item past it.

The SQS message limit is 262,144 bytes (256 KiB), as the issue asks. Since August 2025 AWS
accepts up to the queue's ``MaximumMessageSize``, whose range and default are now 1 MiB; courier
does not raise it, and staying under 256 KiB keeps every queue configuration safe.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any
from xml.sax.saxutils import escape

SQS_MAX_ATTRIBUTES = 10
SQS_MAX_MESSAGE_BYTES = 262_144
SQS_MAX_BATCH_ENTRIES = 10
SQS_MAX_VISIBILITY_TIMEOUT = 43_200
SQS_MAX_DELAY_SECONDS = 900
SQS_MAX_WAIT_SECONDS = 20
SQS_BATCH_ID = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
DYNAMODB_MAX_ITEM_BYTES = 400 * 1024
DYNAMODB_MAX_BATCH_WRITE = 25
KMS_MAX_PLAINTEXT_BYTES = 4096

SQS_BATCH_OPERATIONS = {
    "SendMessageBatch": "SendMessageBatchRequestEntry",
    "DeleteMessageBatch": "DeleteMessageBatchRequestEntry",
    "ChangeMessageVisibilityBatch": "ChangeMessageVisibilityBatchRequestEntry",
}
# Queue attributes (CreateQueue, SetQueueAttributes) with AWS's ranges.
SQS_QUEUE_ATTRIBUTE_RANGES = {
    "VisibilityTimeout": (0, SQS_MAX_VISIBILITY_TIMEOUT),
    "DelaySeconds": (0, SQS_MAX_DELAY_SECONDS),
    "ReceiveMessageWaitTimeSeconds": (0, SQS_MAX_WAIT_SECONDS),
    "MessageRetentionPeriod": (60, 1_209_600),
    "MaximumMessageSize": (1024, 1_048_576),
}


@dataclass(frozen=True)
class AwsRefusal:
    """An error as AWS answers it.

    ``code`` is what botocore reports as ``error.response["Error"]["Code"]``; for SQS's JSON
    protocol that is the query-compatible code of the ``x-amzn-query-error`` header, and
    ``shape`` is the modelled exception name in ``__type`` (botocore's ``QueryErrorCode``).
    """

    service: str
    code: str
    message: str
    status: int = 400
    shape: str = ""

    def json_response(self) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body of the JSON protocols (awsJson1_0/1_1)."""
        if self.service == "sqs":
            document = {"__type": f"com.amazonaws.sqs#{self.shape or self.code}"}
            headers = {"x-amzn-query-error": f"{self.code};Sender"}
        elif self.service == "dynamodb":
            document = {"__type": f"com.amazon.coral.validate#{self.code}"}
            headers = {}
        else:
            document = {"__type": self.code}
            headers = {}
        document["message"] = self.message
        # KMS speaks awsJson1_1, SQS and DynamoDB awsJson1_0.
        content_type = "application/x-amz-json-1.1" if self.service == "kms" else ""
        content_type = content_type or "application/x-amz-json-1.0"
        headers |= {"Content-Type": content_type, "x-amzn-ErrorType": self.code}
        return self.status, headers, json.dumps(document).encode()

    def query_response(self) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body of SQS's query protocol (XML)."""
        body = (
            '<?xml version="1.0"?><ErrorResponse '
            'xmlns="http://queue.amazonaws.com/doc/2012-11-05/"><Error><Type>Sender</Type>'
            f"<Code>{escape(self.code)}</Code><Message>{escape(self.message)}</Message>"
            "<Detail/></Error><RequestId>courier-testkit-strict</RequestId></ErrorResponse>"
        )
        return self.status, {"Content-Type": "text/xml"}, body.encode()

    def failed_entry(self, entry_id: str) -> dict[str, Any]:
        """This refusal as one ``Failed`` entry of a batch answer."""
        return {"Id": entry_id, "SenderFault": True, "Code": self.code, "Message": self.message}


# -- helpers ----------------------------------------------------------------------------------


def _sqs(code: str, message: str, shape: str = "") -> AwsRefusal:
    return AwsRefusal("sqs", code, message, shape=shape)


def _invalid(parameter: str, value: object, reason: str) -> AwsRefusal:
    return _sqs(
        "InvalidParameterValue", f"Value {value} for parameter {parameter} is invalid. {reason}"
    )


def _int(value: object) -> int | None:
    """An integer parameter as JSON (int) or the query protocol (str) sends it; None if absent."""
    if value is None or value == "":
        return None
    try:
        return int(str(value))
    except ValueError:
        return None


def _outside(value: object, low: int, high: int) -> int | None:
    """``value`` as an int when it is present and outside ``low..high``, else None."""
    number = _int(value)
    if number is not None and not low <= number <= high:
        return number
    return None


def _binary_length(value: object) -> int:
    if isinstance(value, bytes):
        return len(value)
    try:
        return len(base64.b64decode(str(value), validate=False))
    except (binascii.Error, ValueError):
        return len(str(value).encode())


# -- SQS: messages ----------------------------------------------------------------------------


def sqs_attribute_bytes(name: str, value: Mapping[str, Any]) -> int:
    """One message attribute's size as SQS counts it: name + data type + value."""
    size = len(name.encode()) + len(str(value.get("DataType", "")).encode())
    if "StringValue" in value:
        size += len(str(value["StringValue"]).encode())
    if "BinaryValue" in value:
        size += _binary_length(value["BinaryValue"])
    return size


def sqs_message_bytes(message: Mapping[str, Any]) -> int:
    """A message's size as SQS counts it: body + every message attribute."""
    attributes = message.get("MessageAttributes") or {}
    return len(str(message.get("MessageBody", "")).encode()) + sum(
        sqs_attribute_bytes(name, value) for name, value in attributes.items()
    )


def _message_refusal(message: Mapping[str, Any]) -> AwsRefusal | None:
    """What AWS refuses in one message (SendMessage, or one SendMessageBatch entry)."""
    count = len(message.get("MessageAttributes") or {})
    if count > SQS_MAX_ATTRIBUTES:
        return _sqs(
            "InvalidParameterValue",
            f"Number of message attributes [{count}] exceeds the allowed maximum "
            f"[{SQS_MAX_ATTRIBUTES}].",
        )
    size = sqs_message_bytes(message)
    if size > SQS_MAX_MESSAGE_BYTES:
        return _sqs(
            "InvalidParameterValue",
            "One or more parameters are invalid. Reason: Message must be shorter than "
            f"{SQS_MAX_MESSAGE_BYTES} bytes.",
        )
    delay = _outside(message.get("DelaySeconds"), 0, SQS_MAX_DELAY_SECONDS)
    if delay is not None:
        return _invalid(
            "DelaySeconds",
            delay,
            f"Reason: DelaySeconds must be >= 0 and <= {SQS_MAX_DELAY_SECONDS}",
        )
    return None


def _visibility_refusal(value: object) -> AwsRefusal | None:
    timeout = _outside(value, 0, SQS_MAX_VISIBILITY_TIMEOUT)
    if timeout is None:
        return None
    return _invalid(
        "VisibilityTimeout",
        timeout,
        f"Reason: VisibilityTimeout must be an integer between 0 and {SQS_MAX_VISIBILITY_TIMEOUT}",
    )


def _receive_refusal(request: Mapping[str, Any]) -> AwsRefusal | None:
    count = _outside(request.get("MaxNumberOfMessages"), 1, SQS_MAX_BATCH_ENTRIES)
    if count is not None:
        return _invalid(
            "MaxNumberOfMessages", count, "Reason: Must be between 1 and 10, if provided."
        )
    wait = _outside(request.get("WaitTimeSeconds"), 0, SQS_MAX_WAIT_SECONDS)
    if wait is not None:
        return _invalid("WaitTimeSeconds", wait, "Reason: Must be >= 0 and <= 20, if provided.")
    return _visibility_refusal(request.get("VisibilityTimeout"))


def _queue_attributes_refusal(request: Mapping[str, Any]) -> AwsRefusal | None:
    for name, value in (request.get("Attributes") or {}).items():
        bounds = SQS_QUEUE_ATTRIBUTE_RANGES.get(name)
        if bounds is not None and _outside(value, *bounds) is not None:
            return _sqs("InvalidAttributeValue", f"Invalid value for the parameter {name}.")
    return None


# -- SQS: batches -----------------------------------------------------------------------------


def _batch_refusal(operation: str, entries: list[Mapping[str, Any]]) -> AwsRefusal | None:
    """What AWS refuses in a batch as a whole (the request fails, nothing is done)."""
    prefix = "AWS.SimpleQueueService."
    if not entries:
        entry_name = SQS_BATCH_OPERATIONS[operation]
        return _sqs(
            prefix + "EmptyBatchRequest",
            f"There should be at least one {entry_name} in the request.",
            "EmptyBatchRequest",
        )
    if len(entries) > SQS_MAX_BATCH_ENTRIES:
        return _sqs(
            prefix + "TooManyEntriesInBatchRequest",
            f"Maximum number of entries per request are {SQS_MAX_BATCH_ENTRIES}. "
            f"You have sent {len(entries)}.",
            "TooManyEntriesInBatchRequest",
        )
    seen: set[str] = set()
    for entry in entries:
        entry_id = str(entry.get("Id", ""))
        if not SQS_BATCH_ID.match(entry_id):
            return _sqs(
                prefix + "InvalidBatchEntryId",
                "A batch entry id can only contain alphanumeric characters, hyphens and "
                "underscores. It can be at most 80 letters long.",
                "InvalidBatchEntryId",
            )
        if entry_id in seen:
            return _sqs(
                prefix + "BatchEntryIdsNotDistinct",
                f"Id {entry_id} repeated.",
                "BatchEntryIdsNotDistinct",
            )
        seen.add(entry_id)
    if operation == "SendMessageBatch":
        total = sum(sqs_message_bytes(entry) for entry in entries)
        if total > SQS_MAX_MESSAGE_BYTES:
            return _sqs(
                prefix + "BatchRequestTooLong",
                f"Batch requests cannot be longer than {SQS_MAX_MESSAGE_BYTES} bytes. "
                f"You have sent {total} bytes.",
                "BatchRequestTooLong",
            )
    return None


def failed_entries(
    service: str, operation: str, request: Mapping[str, Any]
) -> dict[str, AwsRefusal]:
    """Entries of an otherwise valid batch that AWS fails one by one, by entry Id.

    AWS answers such a batch with HTTP 200, these entries in ``Failed`` (``SenderFault``) and
    the others done. Only meaningful once ``check`` accepted the request.
    """
    if service != "sqs" or operation not in ("SendMessageBatch", "ChangeMessageVisibilityBatch"):
        return {}
    judge: Callable[[Mapping[str, Any]], AwsRefusal | None]
    if operation == "SendMessageBatch":
        judge = _message_refusal
    else:
        judge = lambda entry: _visibility_refusal(entry.get("VisibilityTimeout"))  # noqa: E731
    failed = {}
    for entry in request.get("Entries") or []:
        refusal = judge(entry)
        if refusal is not None:
            failed[str(entry.get("Id", ""))] = refusal
    return failed


def _sqs_check(operation: str, request: Mapping[str, Any]) -> AwsRefusal | None:
    if operation in SQS_BATCH_OPERATIONS:
        return _batch_refusal(operation, list(request.get("Entries") or []))
    if operation == "SendMessage":
        return _message_refusal(request)
    if operation == "ReceiveMessage":
        return _receive_refusal(request)
    if operation == "ChangeMessageVisibility":
        return _visibility_refusal(request.get("VisibilityTimeout"))
    if operation in ("CreateQueue", "SetQueueAttributes"):
        return _queue_attributes_refusal(request)
    return None


# -- DynamoDB ---------------------------------------------------------------------------------


def dynamodb_value_bytes(value: Mapping[str, Any]) -> int:
    """One attribute value's size as DynamoDB counts it (name not included)."""
    if not value:
        return 1
    kind, content = next(iter(value.items()))
    sizer = _VALUE_SIZERS.get(kind)
    return sizer(content) if sizer is not None else len(json.dumps(content).encode())


def _utf8_bytes(content: Any) -> int:
    return len(str(content).encode())


def _list_bytes(content: Any) -> int:
    return 3 + sum(1 + dynamodb_value_bytes(item) for item in content)


def _map_bytes(content: Any) -> int:
    return 3 + sum(1 + dynamodb_item_bytes({k: v}) for k, v in content.items())


def _number_bytes(text: str) -> int:
    try:
        digits = Decimal(text).normalize().as_tuple().digits
    except InvalidOperation:
        return len(text.encode())
    return (len(digits) + 1) // 2 + 1


_VALUE_SIZERS: dict[str, Callable[[Any], int]] = {
    "S": _utf8_bytes,
    "N": lambda content: _number_bytes(str(content)),
    "B": _binary_length,
    "BOOL": lambda _: 1,
    "NULL": lambda _: 1,
    "SS": lambda content: sum(_utf8_bytes(item) for item in content),
    "NS": lambda content: sum(_number_bytes(str(item)) for item in content),
    "BS": lambda content: sum(_binary_length(item) for item in content),
    "L": _list_bytes,
    "M": _map_bytes,
}


def dynamodb_item_bytes(item: Mapping[str, Any]) -> int:
    """An item's size as DynamoDB counts it: attribute names + values."""
    return sum(len(name.encode()) + dynamodb_value_bytes(value) for name, value in item.items())


def dynamodb_update_bytes(request: Mapping[str, Any]) -> int:
    """Approximate size of the item an UpdateItem writes: its key, the values and names it sets.

    Exact needs the stored item; this counts only what the request carries.
    """
    size = dynamodb_item_bytes(request.get("Key") or {})
    size += sum(
        dynamodb_value_bytes(v) for v in (request.get("ExpressionAttributeValues") or {}).values()
    )
    size += sum(
        len(str(n).encode()) for n in (request.get("ExpressionAttributeNames") or {}).values()
    )
    for name, update in (request.get("AttributeUpdates") or {}).items():
        size += len(name.encode()) + dynamodb_value_bytes(update.get("Value") or {})
    return size


def _dynamodb(message: str) -> AwsRefusal:
    return AwsRefusal("dynamodb", "ValidationException", message)


def _batch_write_refusal(request: Mapping[str, Any]) -> AwsRefusal | None:
    writes = [w for ws in (request.get("RequestItems") or {}).values() for w in ws]
    if len(writes) > DYNAMODB_MAX_BATCH_WRITE:
        return _dynamodb("Too many items requested for the BatchWriteItem call")
    for write in writes:
        item = (write.get("PutRequest") or {}).get("Item") or {}
        if dynamodb_item_bytes(item) > DYNAMODB_MAX_ITEM_BYTES:
            return _dynamodb("Item size has exceeded the maximum allowed size")
    return None


def _dynamodb_check(operation: str, request: Mapping[str, Any]) -> AwsRefusal | None:
    if operation == "PutItem":
        if dynamodb_item_bytes(request.get("Item") or {}) > DYNAMODB_MAX_ITEM_BYTES:
            return _dynamodb("Item size has exceeded the maximum allowed size")
    elif operation == "UpdateItem":
        if dynamodb_update_bytes(request) > DYNAMODB_MAX_ITEM_BYTES:
            return _dynamodb("Item size to update has exceeded the maximum allowed size")
    elif operation == "BatchWriteItem":
        return _batch_write_refusal(request)
    return None


# -- KMS --------------------------------------------------------------------------------------


def _kms_check(operation: str, request: Mapping[str, Any]) -> AwsRefusal | None:
    if (
        operation == "Encrypt"
        and _binary_length(request.get("Plaintext", "")) > KMS_MAX_PLAINTEXT_BYTES
    ):
        return AwsRefusal(
            "kms",
            "ValidationException",
            "1 validation error detected: Value at 'plaintext' failed to satisfy constraint: "
            f"Member must have length less than or equal to {KMS_MAX_PLAINTEXT_BYTES}",
        )
    if (
        operation == "GenerateDataKey"
        and _outside(request.get("NumberOfBytes"), 1, 1024) is not None
    ):
        return AwsRefusal(
            "kms",
            "ValidationException",
            "1 validation error detected: Value at 'numberOfBytes' failed to satisfy constraint: "
            "Member must have value less than or equal to 1024",
        )
    return None


_CHECKS: dict[str, Callable[[str, Mapping[str, Any]], AwsRefusal | None]] = {
    "sqs": _sqs_check,
    "dynamodb": _dynamodb_check,
    "kms": _kms_check,
}


def check(service: str, operation: str, request: Mapping[str, Any]) -> AwsRefusal | None:
    """The error AWS answers ``operation`` of ``service`` ("sqs", "dynamodb", "kms") with,
    or None when AWS accepts the request as a whole (see ``failed_entries`` for batches)."""
    judge = _CHECKS.get(service)
    return judge(operation, request) if judge is not None else None


# -- SQS query protocol -----------------------------------------------------------------------


def decode_query(params: Mapping[str, str]) -> dict[str, Any]:
    """An SQS query-protocol form (``MessageAttribute.1.Name=...``) in the JSON protocol's shape."""
    request: dict[str, Any] = _listify(_unflatten(params))
    for entry_name in SQS_BATCH_OPERATIONS.values():
        if entry_name in request:
            request["Entries"] = [_normalise_message(e) for e in request.pop(entry_name)]
    if "Attribute" in request:
        request["Attributes"] = {a.get("Name"): a.get("Value") for a in request.pop("Attribute")}
    _normalise_message(request)
    return request


def _normalise_message(message: Any) -> Any:
    if isinstance(message, dict) and "MessageAttribute" in message:
        message["MessageAttributes"] = {
            a.get("Name", ""): a.get("Value", {}) for a in message.pop("MessageAttribute")
        }
    return message


def _unflatten(params: Mapping[str, str]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for key, value in params.items():
        *path, last = key.split(".")
        node = root
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[last] = value
    return root


def _listify(node: Any) -> Any:
    """Dicts whose keys are all numbers (``Entry.1``, ``Entry.2``) become lists, in order."""
    if not isinstance(node, dict):
        return node
    items = {key: _listify(value) for key, value in node.items()}
    if items and all(key.isdigit() for key in items):
        return [items[key] for key in sorted(items, key=int)]
    return items
