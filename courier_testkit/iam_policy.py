"""The instance role's IAM policy, rendered from terraform/iam.tf, and the checks run against it.

Three parts, used by tests/test_iam.py:

- **Rendering.** ``render_policy`` turns a parsed ``data "aws_iam_policy_document"`` block into
  the IAM JSON document AWS would hold, with every reference substituted: ``refs`` gives the
  value of an expression (``aws_sqs_queue.work.arn`` -> the test's queue ARN), ``variables``
  the module's input variables (a variable left out takes its declared default), and locals
  are evaluated from their definitions (``courier_testkit.hcl_expressions``: conditionals,
  ``for`` expressions, common functions; anything else fails, naming the expression).
  ``dynamic`` blocks are expanded over their ``for_each`` (map or list), for statements and
  for conditions alike. The .tf files are parsed by terraform/scripts/hcl2json.py in
  .venv-hcl2, the loader tests/test_terraform.py uses.
- **Evaluation.** ``evaluate`` decides whether a policy allows one ``AccessRequest`` (action,
  resource ARN, condition context): explicit Deny wins, then any Allow; ``Action`` /
  ``NotAction`` / ``Resource`` / ``NotResource`` with ``*`` and ``?`` wildcards; conditions
  with the String*, Arn*, Bool and Null operators, the ``ForAllValues:`` / ``ForAnyValue:``
  qualifiers and ``IfExists``. Not evaluated (an ``UnevaluableCondition`` is raised, so
  nothing passes unchecked): numeric, date, IP and binary operators, and condition keys the
  request context does not compute (``aws:*`` global keys among them). Principals,
  permission boundaries, SCPs, session policies and resource (key, queue) policies are
  outside its scope.
- **AWS calls to IAM requests.** ``access_requests`` maps one recorded AWS call (see
  ``courier_testkit.iam_moto``) to the IAM requests AWS authorises for it: batch operations
  to their IAM action (``SendMessageBatch`` -> ``sqs:SendMessage`` per queue, DynamoDB
  transactions per item), the resource from ``QueueUrl`` / ``TableName`` / ``KeyId`` or the
  ciphertext, and the context keys ``kms:EncryptionContext:<key>``,
  ``kms:EncryptionContextKeys`` and ``dynamodb:LeadingKeys``.

``moto_projection`` derives what moto can enforce from the exact policy; moto's own IAM check
is weaker (see its docstring), so the exact policy is checked here, call by call.
"""

from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import fnmatch
import json
import re
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from courier_testkit.hcl_expressions import Definitions, ExpressionError, Scope, evaluate_value

REPO = Path(__file__).resolve().parent.parent
TERRAFORM = REPO / "terraform"
PARSER = TERRAFORM / "scripts" / "hcl2json.py"
PARSER_PYTHON = REPO / ".venv-hcl2" / "bin" / "python"
SETUP_HINT = "run `make terraform-check` (bash terraform/check.sh), which creates .venv-hcl2"


class PolicyRenderError(Exception):
    """The Terraform could not be rendered into an IAM policy."""


class ParserUnavailable(PolicyRenderError):
    """The python-hcl2 environment (.venv-hcl2) is missing."""


class UnevaluableCondition(Exception):
    """A condition the evaluator cannot decide (operator or context key it does not compute)."""


# --------------------------------------------------------------------------------------
# Terraform: parsing and expression evaluation
# --------------------------------------------------------------------------------------


@dataclass
class TerraformModule:
    """The resources, data sources, locals and variables of one Terraform module (its top-level
    .tf files)."""

    resources: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    data: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    locals: dict[str, Any] = field(default_factory=dict)
    variables: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def definitions(self) -> Definitions:
        """What expressions may name: locals and declared variables."""
        return Definitions(self.locals, self.variables)

    @classmethod
    def from_parsed(cls, files: Mapping[str, Any]) -> TerraformModule:
        """Collect blocks from hcl2json output (``{"files": {path: parsed}}``'s value)."""
        module = cls()
        for path, parsed in files.items():
            if "/" in path:  # examples/, tests/: other modules
                continue
            for section, blocks in (("resource", module.resources), ("data", module.data)):
                for entry in parsed.get(section, []):
                    for kind, named in entry.items():
                        for name, body in named.items():
                            blocks[(kind, name)] = body
            for entry in parsed.get("locals", []):
                module.locals.update(entry)
            for entry in parsed.get("variable", []):
                module.variables.update(entry)
        return module


def load_module(directory: Path = TERRAFORM) -> TerraformModule:
    """Parse ``directory``'s .tf files with python-hcl2 (in .venv-hcl2, like test_terraform)."""
    if not PARSER_PYTHON.exists():
        raise ParserUnavailable(f"{PARSER_PYTHON.parent.parent} is missing: {SETUP_HINT}")
    result = subprocess.run(  # noqa: S603 - our own parser script, in our own venv
        [str(PARSER_PYTHON), str(PARSER), str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise PolicyRenderError(f"hcl2json failed on {directory}:\n{result.stderr}")
    return TerraformModule.from_parsed(json.loads(result.stdout)["files"])


# --------------------------------------------------------------------------------------
# aws_iam_policy_document -> IAM JSON
# --------------------------------------------------------------------------------------

_STATEMENT_KEYS = {
    "sid",
    "effect",
    "actions",
    "not_actions",
    "resources",
    "not_resources",
    "principals",
    "not_principals",
    "condition",
    "dynamic",
}
_LISTS = {
    "actions": "Action",
    "not_actions": "NotAction",
    "resources": "Resource",
    "not_resources": "NotResource",
}


def render_policy(
    module: TerraformModule,
    document: str,
    *,
    refs: Mapping[str, Any] | None = None,
    variables: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The IAM JSON of ``data "aws_iam_policy_document" "<document>"`` with values substituted.

    ``refs``: expression text (without ``${}``) -> value, e.g. ``{"aws_sqs_queue.work.arn":
    arn}``; a prefix such as ``aws_sqs_queue.work`` may map to an object of attributes.
    ``variables``: input variable values (defaults fill the rest).
    """
    body = module.data.get(("aws_iam_policy_document", document))
    if body is None:
        raise PolicyRenderError(f'data "aws_iam_policy_document" "{document}" is missing')
    unsupported = set(body) - {"statement", "version", "policy_id", "dynamic"}
    if unsupported:
        raise PolicyRenderError(f"{document}: unsupported arguments {sorted(unsupported)}")
    scope = Scope(module.definitions, refs or {}, variables or {})
    try:
        return _render(body, scope)
    except ExpressionError as exc:
        raise PolicyRenderError(f"{document}: {exc}") from None


def _render(body: Mapping[str, Any], scope: Scope) -> dict[str, Any]:
    expanded = expand_dynamic(body, scope)
    statements = [_statement(s, scope) for s in expanded.get("statement", [])]
    policy: dict[str, Any] = {"Version": expanded.get("version", "2012-10-17")}
    if "policy_id" in expanded:
        policy["Id"] = evaluate_value(expanded["policy_id"], scope)
    policy["Statement"] = statements
    return policy


def expand_dynamic(body: Mapping[str, Any], scope: Scope) -> dict[str, Any]:
    """``body`` with its ``dynamic "<block>"`` entries expanded into ``<block>`` entries."""
    out = {key: value for key, value in body.items() if key != "dynamic"}
    for entry in body.get("dynamic", []):
        for block_type, spec in entry.items():
            iterator = spec.get("iterator", block_type)
            collection = evaluate_value(spec["for_each"], scope)
            items = collection.items() if isinstance(collection, dict) else enumerate(collection)
            for key, value in items:
                inner = scope.bind(**{iterator: {"key": key, "value": value}})
                for content in spec.get("content", []):
                    block = evaluate_value(expand_dynamic(content, inner), inner)
                    out.setdefault(block_type, []).append(block)
    return out


def _statement(raw: Mapping[str, Any], scope: Scope) -> dict[str, Any]:
    unknown = set(raw) - _STATEMENT_KEYS
    if unknown:
        raise PolicyRenderError(f"statement {raw.get('sid')!r}: unsupported {sorted(unknown)}")
    body = evaluate_value(expand_dynamic(raw, scope), scope)
    statement: dict[str, Any] = {}
    if body.get("sid"):
        statement["Sid"] = body["sid"]
    statement["Effect"] = body.get("effect", "Allow")
    for source, target in _LISTS.items():
        if source in body:
            statement[target] = _strings(body[source], f"{body.get('sid')}.{source}")
    for source, target in (("principals", "Principal"), ("not_principals", "NotPrincipal")):
        if source in body:
            statement[target] = _principals(body[source])
    if body.get("condition"):
        statement["Condition"] = _conditions(body["condition"], body.get("sid"))
    return statement


def _strings(value: Any, what: str) -> list[str]:
    flat: list[str] = []
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, list):
            flat += _strings(item, what)
        elif isinstance(item, str):
            flat.append(item)
        else:
            raise PolicyRenderError(f"{what}: {item!r} is not a string")
    return flat


def _principals(blocks: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for block in blocks:
        out.setdefault(block["type"], []).extend(_strings(block["identifiers"], "principals"))
    return out


def _conditions(blocks: Sequence[Mapping[str, Any]], sid: Any) -> dict[str, dict[str, list[str]]]:
    out: dict[str, dict[str, list[str]]] = {}
    for block in blocks:
        test, variable = block["test"], block["variable"]
        values = _strings(block["values"], f"{sid}.condition {variable}")
        by_key = out.setdefault(test, {})
        if variable in by_key:
            raise PolicyRenderError(f"statement {sid!r}: two {test} conditions on {variable}")
        by_key[variable] = values
    return out


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccessRequest:
    """One authorisation AWS makes: an action on a resource, with its condition context.

    ``context`` maps condition keys (lower case) to their values in this request;
    ``computed`` lists the key prefixes (lower case) the context was computed for: a key
    under one of them that is absent from ``context`` is absent from the request, any other
    key is unknown and makes a condition on it unevaluable.
    """

    action: str
    resource: str
    context: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    computed: tuple[str, ...] = ()
    call: str = ""  # what the caller did, for messages (operation, key id)

    def describe(self) -> str:
        """``action on resource`` plus the context, for failure messages."""
        context = ", ".join(f"{k}={list(v)}" for k, v in sorted(self.context.items()))
        return f"{self.action} on {self.resource}" + (f" [{context}]" if context else "")


@dataclass(frozen=True)
class Decision:
    """The outcome of ``evaluate``: allowed or not, and why."""

    allowed: bool
    reason: str


def evaluate(policy: Mapping[str, Any], request: AccessRequest) -> Decision:
    """Whether ``policy`` allows ``request`` (explicit Deny > Allow > implicit deny)."""
    allowed_by: list[str] = []
    near: list[str] = []
    for index, statement in enumerate(_as_list(policy.get("Statement", []))):
        name = statement.get("Sid") or f"#{index}"
        if not _action_matches(statement, request.action):
            continue
        if not _resource_matches(statement, request.resource):
            near.append(f"{name} allows the action on {_resources_text(statement)} only")
            continue
        failed = _failed_condition(statement.get("Condition", {}), request)
        if failed:
            near.append(f"{name} matches but its condition {failed} does not hold")
            continue
        if statement.get("Effect") == "Deny":
            return Decision(False, f"explicitly denied by statement {name}")
        allowed_by.append(name)
    if allowed_by:
        return Decision(True, f"allowed by {', '.join(allowed_by)}")
    detail = "; ".join(near) if near else "no statement names the action"
    return Decision(False, f"not allowed ({detail})")


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _wildcard(pattern: str, value: str, *, ignore_case: bool = False) -> bool:
    if ignore_case:
        pattern, value = pattern.lower(), value.lower()
    escaped = pattern.replace("[", "[[]")  # only * and ? are IAM wildcards
    return fnmatch.fnmatchcase(value, escaped)


def _action_matches(statement: Mapping[str, Any], action: str) -> bool:
    if "NotAction" in statement:
        return not any(
            _wildcard(p, action, ignore_case=True) for p in _as_list(statement["NotAction"])
        )
    return any(_wildcard(p, action, ignore_case=True) for p in _as_list(statement.get("Action")))


def _resource_matches(statement: Mapping[str, Any], resource: str) -> bool:
    if "NotResource" in statement:
        return not any(_wildcard(p, resource) for p in _as_list(statement["NotResource"]))
    return any(_wildcard(p, resource) for p in _as_list(statement.get("Resource", [])))


def _resources_text(statement: Mapping[str, Any]) -> str:
    if "NotResource" in statement:
        return f"everything but {_as_list(statement['NotResource'])}"
    return str(_as_list(statement.get("Resource", [])))


def _failed_condition(conditions: Mapping[str, Mapping[str, Any]], request: AccessRequest) -> str:
    """The first condition of a statement that does not hold ('' when all hold)."""
    for operator, by_key in conditions.items():
        for key, expected in by_key.items():
            if not _condition_holds(operator, key, _as_list(expected), request):
                return f"{operator} {key} {_as_list(expected)}"
    return ""


_STRING_TESTS: dict[str, tuple[Callable[[str, str], bool], bool]] = {
    "StringEquals": (lambda p, v: p == v, False),
    "StringNotEquals": (lambda p, v: p == v, True),
    "StringEqualsIgnoreCase": (lambda p, v: p.lower() == v.lower(), False),
    "StringNotEqualsIgnoreCase": (lambda p, v: p.lower() == v.lower(), True),
    "StringLike": (_wildcard, False),
    "StringNotLike": (_wildcard, True),
    "ArnEquals": (lambda p, v: p == v, False),
    "ArnNotEquals": (lambda p, v: p == v, True),
    "ArnLike": (_wildcard, False),
    "ArnNotLike": (_wildcard, True),
    "Bool": (lambda p, v: p.lower() == v.lower(), False),
}


def _condition_holds(operator: str, key: str, expected: list[Any], request: AccessRequest) -> bool:
    qualifier, _, base = operator.rpartition(":")
    if_exists = base.endswith("IfExists") and base != "IfExists"
    base = base.removesuffix("IfExists") if if_exists else base
    lowered = key.lower()
    if not any(lowered.startswith(prefix) for prefix in request.computed):
        raise UnevaluableCondition(
            f"{operator} on {key}: the test does not compute this key for {request.action}"
        )
    values = request.context.get(lowered)
    if base == "Null":
        return (values is None) == (str(expected[0]).lower() == "true")
    if base not in _STRING_TESTS:
        raise UnevaluableCondition(f"condition operator {operator} is not evaluated")
    test, negated = _STRING_TESTS[base]
    wanted = [str(e) for e in expected]

    def matches(value: str) -> bool:
        hit = any(test(pattern, value) for pattern in wanted)
        return not hit if negated else hit

    if qualifier == "ForAllValues":
        return values is None or all(matches(v) for v in values)
    if qualifier == "ForAnyValue":
        return values is not None and any(matches(v) for v in values)
    if qualifier:
        raise UnevaluableCondition(f"condition qualifier {qualifier} is not evaluated")
    if values is None:
        return if_exists or negated  # a missing key fails a positive test, passes a negated one
    return all(matches(v) for v in values)


# --------------------------------------------------------------------------------------
# What moto can enforce
# --------------------------------------------------------------------------------------

# moto authorises these under their own operation names, which are not IAM actions: AWS
# authorises a batch with the single-message action.
MOTO_BATCH_ALIASES = {
    "sqs:sendmessage": "sqs:SendMessageBatch",
    "sqs:deletemessage": "sqs:DeleteMessageBatch",
    "sqs:changemessagevisibility": "sqs:ChangeMessageVisibilityBatch",
}
# Services for which moto checks the statement's Resource against the real ARN. For the
# others (DynamoDB, KMS) moto passes "*" as the resource, so only a statement whose Resource
# is "*" can ever allow a call there.
MOTO_RESOURCE_AWARE = ("sqs:",)


def moto_projection(policy: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``policy`` moto 5.2 can enforce, as a policy to attach in moto.

    Allow statements only; for DynamoDB and KMS actions the resource becomes "*" (moto cannot
    match ARNs there) and conditions are dropped (moto knows none of their keys); SQS batch
    operations are allowed wherever their single-message action is. What moto then refuses
    is an action the exact policy grants nowhere; resources and conditions are checked
    against the exact policy by ``evaluate`` on the recorded calls.
    """
    statements = []
    for statement in _as_list(copy.deepcopy(dict(policy)).get("Statement", [])):
        if statement.get("Effect") != "Allow" or "NotAction" in statement:
            continue
        actions = _as_list(statement["Action"])
        actions += [
            MOTO_BATCH_ALIASES[a.lower()] for a in actions if a.lower() in MOTO_BATCH_ALIASES
        ]
        statement["Action"] = actions
        statement.pop("Condition", None)
        if not all(a.lower().startswith(MOTO_RESOURCE_AWARE) for a in actions):
            statement.pop("NotResource", None)
            statement["Resource"] = "*"
        statements.append(statement)
    return {"Version": "2012-10-17", "Statement": statements}


# --------------------------------------------------------------------------------------
# Recorded AWS calls -> IAM requests
# --------------------------------------------------------------------------------------

SQS_ACTIONS = {
    "SendMessageBatch": "SendMessage",
    "DeleteMessageBatch": "DeleteMessage",
    "ChangeMessageVisibilityBatch": "ChangeMessageVisibility",
}
KMS_CONTEXT_PREFIXES = ("kms:encryptioncontext:", "kms:encryptioncontextkeys")
DYNAMODB_CONTEXT_PREFIXES = ("dynamodb:leadingkeys",)
DYNAMODB_TRANSACT = {
    "ConditionCheck": "ConditionCheckItem",
    "Put": "PutItem",
    "Update": "UpdateItem",
    "Delete": "DeleteItem",
    "Get": "GetItem",
}
# The batch operations are IAM actions of their own (Service Authorization Reference, "Actions,
# resources, and condition keys for Amazon DynamoDB": BatchWriteItem -> dynamodb:BatchWriteItem,
# BatchGetItem -> dynamodb:BatchGetItem), unlike SQS's batches; each item is still a request
# (its table and, for dynamodb:LeadingKeys, its key).
DYNAMODB_BATCH_WRITE = {
    "PutRequest": ("BatchWriteItem", "Item"),
    "DeleteRequest": ("BatchWriteItem", "Key"),
}
MOTO_KEY_ID_BYTES = 36  # moto's ciphertext blob starts with the key id (a UUID)


@dataclass(frozen=True)
class AwsAccount:
    """How names in calls become ARNs: the account, and what the test knows of its resources.

    ``key_arns`` maps every way a call may name a KMS key (key id, ARN, alias name, alias ARN)
    to the key's ARN. ``partition_keys`` maps a table ARN to its partition key attribute.
    """

    account_id: str
    key_arns: Mapping[str, str] = field(default_factory=dict)
    partition_keys: Mapping[str, str] = field(default_factory=dict)
    partition: str = "aws"


@dataclass(frozen=True)
class RecordedCall:
    """One signed AWS request as ``courier_testkit.iam_moto`` records it."""

    access_key_id: str
    region: str
    service: str  # the signing name: sqs, dynamodb, kms
    operation: str
    params: Mapping[str, Any]
    status: int
    response: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> RecordedCall:
        """From one line of the recorder's file."""
        return cls(
            access_key_id=document["access_key_id"],
            region=document["region"],
            service=document["service"],
            operation=document["operation"],
            params=document.get("params") or {},
            status=int(document["status"]),
            response=document.get("response") or {},
        )

    def describe(self) -> str:
        """E.g. ``sqs SendMessageBatch (HTTP 200)``."""
        return f"{self.service} {self.operation} (HTTP {self.status})"


def access_requests(call: RecordedCall, account: AwsAccount) -> list[AccessRequest]:
    """The IAM authorisations AWS makes for ``call`` (one per resource and item kind)."""
    builders = {"sqs": _sqs_requests, "dynamodb": _dynamodb_requests, "kms": _kms_requests}
    builder = builders.get(call.service)
    if builder is None:
        raise UnevaluableCondition(f"no IAM mapping for {call.service} {call.operation}")
    return builder(call, account)


def _sqs_requests(call: RecordedCall, account: AwsAccount) -> list[AccessRequest]:
    action = f"sqs:{SQS_ACTIONS.get(call.operation, call.operation)}"
    url = call.params.get("QueueUrl", "")
    if url:
        owner, name = urlparse(url).path.strip("/").split("/")[-2:]
        resource = f"arn:{account.partition}:sqs:{call.region}:{owner}:{name}"
    elif "QueueName" in call.params:
        name = call.params["QueueName"]
        resource = f"arn:{account.partition}:sqs:{call.region}:{account.account_id}:{name}"
    else:
        resource = "*"
    return [AccessRequest(action, resource, call=call.describe())]


def _table_arn(name: str, call: RecordedCall, account: AwsAccount) -> str:
    if name.startswith("arn:"):
        return name
    return f"arn:{account.partition}:dynamodb:{call.region}:{account.account_id}:table/{name}"


def _dynamodb_requests(call: RecordedCall, account: AwsAccount) -> list[AccessRequest]:
    params = call.params
    if call.operation in ("TransactWriteItems", "TransactGetItems"):
        return [
            _dynamodb_item_request(DYNAMODB_TRANSACT[kind], body, call, account)
            for item in params.get("TransactItems", [])
            for kind, body in item.items()
        ]
    if call.operation == "BatchWriteItem":
        return [
            _dynamodb_item_request(
                action, {"TableName": table, "Key": request[kind][field_]}, call, account
            )
            for table, requests in params.get("RequestItems", {}).items()
            for request in requests
            for kind, (action, field_) in DYNAMODB_BATCH_WRITE.items()
            if kind in request
        ]
    if call.operation == "BatchGetItem":
        return [
            _dynamodb_item_request("BatchGetItem", {"TableName": table, "Key": key}, call, account)
            for table, spec in params.get("RequestItems", {}).items()
            for key in spec.get("Keys", [])
        ]
    return [_dynamodb_item_request(call.operation, params, call, account)]


def _dynamodb_item_request(
    operation: str, params: Mapping[str, Any], call: RecordedCall, account: AwsAccount
) -> AccessRequest:
    table = params.get("TableName", "")
    resource = _table_arn(table, call, account) if table else "*"
    if params.get("IndexName"):
        resource += f"/index/{params['IndexName']}"
    context: dict[str, tuple[str, ...]] = {}
    leading = _leading_key(
        operation, params, account.partition_keys.get(resource.split("/index/")[0])
    )
    if leading is not None:
        context["dynamodb:leadingkeys"] = (leading,)
    return AccessRequest(
        f"dynamodb:{operation}", resource, context, DYNAMODB_CONTEXT_PREFIXES, call.describe()
    )


def _leading_key(operation: str, params: Mapping[str, Any], attribute: str | None) -> str | None:
    """The partition key value an item or query names (``dynamodb:LeadingKeys``)."""
    if attribute is None:
        return None
    if operation == "Query":
        return _query_partition_value(params, attribute)
    item = params.get("Key") or params.get("Item") or {}
    value = item.get(attribute)
    return _attribute_text(value) if value is not None else None


def _query_partition_value(params: Mapping[str, Any], attribute: str) -> str | None:
    names = params.get("ExpressionAttributeNames", {})
    values = params.get("ExpressionAttributeValues", {})
    expression = params.get("KeyConditionExpression", "")
    for term in re.split(r"\s+and\s+", expression, flags=re.IGNORECASE):
        left, sep, right = term.strip(" ()").partition("=")
        if not sep:
            continue
        left, right = left.strip(), right.strip()
        if names.get(left, left) == attribute and right in values:
            return _attribute_text(values[right])
    return None


def _attribute_text(value: Mapping[str, Any]) -> str:
    kind, raw = next(iter(value.items()))
    return str(raw) if kind in ("S", "N") else f"{kind}:{raw}"


def _kms_requests(call: RecordedCall, account: AwsAccount) -> list[AccessRequest]:
    resource = _kms_key_arn(call, account)
    context: dict[str, tuple[str, ...]] = {}
    encryption_context = call.params.get("EncryptionContext") or {}
    for key, value in encryption_context.items():
        context[f"kms:encryptioncontext:{key}".lower()] = (str(value),)
    if encryption_context:
        context["kms:encryptioncontextkeys"] = tuple(encryption_context)
    return [
        AccessRequest(
            f"kms:{call.operation}", resource, context, KMS_CONTEXT_PREFIXES, call.describe()
        )
    ]


def _kms_key_arn(call: RecordedCall, account: AwsAccount) -> str:
    named = call.params.get("KeyId") or call.response.get("KeyId") or _blob_key_id(call)
    if not named:
        return "*"
    if named in account.key_arns:
        return account.key_arns[named]
    if named.startswith("arn:") and ":key/" in named:
        return str(named)
    return f"arn:{account.partition}:kms:{call.region}:{account.account_id}:key/{named}"


def _blob_key_id(call: RecordedCall) -> str:
    blob = call.params.get("CiphertextBlob")
    if not blob:
        return ""
    try:
        raw = base64.b64decode(blob)
    except (binascii.Error, ValueError):
        return ""
    return raw[:MOTO_KEY_ID_BYTES].decode("ascii", errors="replace")


# --------------------------------------------------------------------------------------
# The check tests run
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    """IAM requests of one action on one resource that the policy does not allow."""

    request: AccessRequest  # the first of them
    call: RecordedCall
    reason: str
    count: int = 1

    def __str__(self) -> str:
        times = f"{self.count} calls, first " if self.count > 1 else ""
        return f"{self.request.describe()} ({times}{self.call.describe()}): {self.reason}"


def unauthorised(
    policy: Mapping[str, Any], calls: Iterable[RecordedCall], account: AwsAccount
) -> list[Violation]:
    """The IAM requests of ``calls`` that ``policy`` does not allow, one per action, resource
    and reason."""
    found: dict[tuple[str, str, str], Violation] = {}
    for call in calls:
        for request in access_requests(call, account):
            decision = evaluate(policy, request)
            if decision.allowed:
                continue
            key = (request.action, request.resource, decision.reason)
            seen = found.get(key)
            found[key] = (
                Violation(request, call, decision.reason)
                if seen is None
                else dataclasses.replace(seen, count=seen.count + 1)
            )
    return list(found.values())


def actions_used(calls: Iterable[RecordedCall], account: AwsAccount) -> set[str]:
    """The IAM actions ``calls`` needed."""
    return {request.action for call in calls for request in access_requests(call, account)}


def without_action(policy: Mapping[str, Any], action: str) -> dict[str, Any]:
    """A copy of ``policy`` in which no statement lists ``action`` (to prove checks fail)."""
    changed = copy.deepcopy(dict(policy))
    for statement in _as_list(changed.get("Statement", [])):
        if "Action" in statement:
            statement["Action"] = [
                a for a in _as_list(statement["Action"]) if a.lower() != action.lower()
            ]
    changed["Statement"] = [s for s in _as_list(changed["Statement"]) if s.get("Action", True)]
    return changed
