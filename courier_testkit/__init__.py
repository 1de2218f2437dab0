"""courier's shared test kit: what tests/, bench/ and chaos/ use to stand in for AWS and friends.

Not shipped in the wheel (``service*`` only): importable from the repository root, which
pytest, ``python -m bench`` and ``python -m chaos`` put on ``sys.path``.

The API (``from courier_testkit import X``; each name lives in the module named)
--------------------------------------------------------------------------------
=================================  ==============================================================
``EmbeddedAws``, ``bootstrap``     (``service.local``, ``service.bootstrap``) moto in a thread,
                                   and courier's resources: the very ones ``courier local`` and
                                   ``courier bootstrap`` ship, re-exported
``aws_stack()`` -> ``AwsStack``    (``aws``) fauxqs + dynalite + moto processes behind the
                                   counting proxy, bootstrapped on demand; also ``fauxqs()``
                                   (launcher: ``fauxqs.running_fauxqs``), ``dynalite()``,
                                   ``moto_process()``, ``demo_secrets()``
``StubIdm``, ``StubTarget``        (``stubs``) the IdM and legacy-system stubs: ``service.stubs``'
                                   route table plus latency, failure and capacity knobs, call and
                                   effect records (``EffectRecorder``), a reject marker
``stub_process()`` ->              (``stubs``) those stubs in a process of their own
``StubProcess``                    (``python -m courier_testkit.stubs``) and its HTTP client
``courier_process()`` ->           (``courier``) ``courier run`` as a child: wait-ready, signals,
``CourierProcess``                 logs, /metrics, CPU and memory
``counting_proxy()`` ->            (``proxy``) the counting, strict-limits reverse proxy
``CountingProxy``                  (``python -m courier_testkit.proxy``) and its client;
                                   ``counter_delta``
``TcpProxy``, ``tcp_proxy()``      (``tcpproxy``) a TCP relay that can be cut and restored,
                                   optionally terminating TLS (an HTTPS front for an emulator)
``local_tls()`` -> ``LocalTls``    (``tls``) a CA made for the test (the ``AWS_CA_BUNDLE``
                                   file) and a server context with a ``localhost`` certificate
``tinyproxy()`` -> ``TinyProxy``   (``tinyproxy``) Debian's tinyproxy as an egress proxy with
                                   Basic authentication; the requests it forwarded, from its log
``haproxy()`` -> ``HAProxy``,      (``haproxy``) HAProxy as the ALB stand-in: configured from a
``TargetGroup``,                   ``TargetGroup`` (health check, deregistration delay) read from
``target_group_from_terraform``    terraform/alb.tf; register, drain/deregister, state over its
                                   runtime API
``mint_token``                     (``tokens``) a bearer token made by ``courier token``'s
                                   ``issue_token``, claims overridable
``ProcessSampler``                 (``sampling``) pid, CPU seconds and memory of a process (every
                                   process handle above is one); ``machine()``
``ManagedProcess``, ``managed()``  (``processes``) a child in its own process group, always
``wait_http()``, ``python_env()``  stopped; ``HarnessError`` when one does not start
``free_port``, ``bound_port``,     (``ports``) a free port; the port a started aiohttp site got;
``serving()``                      an app served in this loop on a free port
``seal_events``, ``send_events``   (``events``) create-mailbox events sealed and queued as the
                                   API seals and queues them
=================================  ==============================================================

Every process the kit starts runs in a process group of its own and is stopped on exit, also
after a failure; ``processes.kill_all`` (run at exit) ends any group still alive.

Strict AWS limits (on by default everywhere the emulators are used)
-------------------------------------------------------------------
moto and fauxqs accept requests real AWS refuses. The strict layer stands in front of them
and answers those requests as AWS does, with AWS's error code and HTTP status, shaped so
botocore parses the code (``ClientError.response["Error"]["Code"]``):

========================================  =====================================================
refused                                   answer (HTTP 400 unless noted)
========================================  =====================================================
SQS message with > 10 attributes          ``InvalidParameterValue`` (SendMessage); in a
                                          SendMessageBatch that entry is ``Failed`` (HTTP 200)
SQS message > 256 KiB (body + attributes) ``InvalidParameterValue`` / ``Failed`` entry
SQS DelaySeconds outside 0..900           ``InvalidParameterValue`` / ``Failed`` entry
SQS VisibilityTimeout outside 0..43,200   ``InvalidParameterValue`` (ReceiveMessage,
                                          ChangeMessageVisibility; ``Failed`` entry in its batch)
ReceiveMessage MaxNumberOfMessages 1..10, ``InvalidParameterValue``
WaitTimeSeconds 0..20
queue attribute out of range (Create/Set) ``InvalidAttributeValue``
batch with no entries                     ``AWS.SimpleQueueService.EmptyBatchRequest``
batch with > 10 entries                   ``AWS.SimpleQueueService.TooManyEntriesInBatchRequest``
batch with repeated entry Ids             ``AWS.SimpleQueueService.BatchEntryIdsNotDistinct``
batch entry Id not ``[A-Za-z0-9_-]{1,80}``  ``AWS.SimpleQueueService.InvalidBatchEntryId``
SendMessageBatch > 256 KiB in total       ``AWS.SimpleQueueService.BatchRequestTooLong``
DynamoDB item > 400 KB (PutItem,          ``ValidationException`` "Item size has exceeded the
BatchWriteItem; UpdateItem approximated)  maximum allowed size"
BatchWriteItem with > 25 requests         ``ValidationException``
KMS Encrypt plaintext > 4 KiB,            ``ValidationException``
GenerateDataKey NumberOfBytes > 1024
========================================  =====================================================

For SQS's JSON protocol (what botocore 1.43 speaks) the answer is ``{"__type":
"com.amazonaws.sqs#<Exception>", "message": ...}`` with ``x-amzn-query-error: <code>;Sender``,
as AWS sends it; botocore then reports ``Error.Code`` = the query code (e.g.
``AWS.SimpleQueueService.TooManyEntriesInBatchRequest``) and ``Error.QueryErrorCode`` = the
exception name, so ``client.exceptions.TooManyEntriesInBatchRequest`` catches it. The SQS query
protocol (XML) is decoded and refused too; there a batch with failing entries is refused whole.

API:

- ``aws_limits.check(service, operation, request) -> AwsRefusal | None`` and
  ``aws_limits.failed_entries(service, operation, request) -> {entry id: AwsRefusal}``: the
  rules, pure functions over the decoded request (JSON protocol shape).
- ``strict.StrictWsgi(app, recorder, enforce=True)``: WSGI middleware for moto's server (the
  test-suite's ``moto_endpoint`` fixture uses it through ``EmbeddedAws(wsgi_middleware=...)``).
- ``proxy.py`` (the counting proxy of bench and chaos) enforces the same rules through
  ``strict.inspect``; ``--lenient`` turns it off.

Recording AWS calls per access key
----------------------------------
The layer records every AWS call it sees in a ``strict.ActionRecorder`` (thread-safe), keyed
by the access key id of the SigV4 ``Authorization`` header (``Credential=AKID/...``):

- ``recorder.calls() -> {AwsCall: count}``, where ``AwsCall(access_key, service, operation,
  resources)`` and ``call.action`` is the IAM action (``"sqs:SendMessage"``); ``resources``
  are the queue URLs, table names or KMS key ids/aliases the request names;
- ``recorder.actions(access_key=None) -> {"sqs:SendMessage", ...}``;
- ``recorder.refusals() -> [(AwsCall, AwsRefusal)]``: what the layer itself refused;
- ``recorder.as_json()`` and ``recorder.clear()``.

In the test-suite the session's recorder is the ``aws_calls`` fixture; in bench and chaos ``GET /_proxy/stats`` carries it under
``"_calls"`` (``CountingProxy.calls()``).

``terraform_moto``: ``make terraform-check``'s apply/plan/destroy of the Terraform against moto.
``nspawn``: boot a root with systemd as PID 1 (``booted(root)`` -> ``Machine``: run commands
inside, ``systemctl``, its journal, ``poweroff``), as ``make test-provisioning`` boots the image.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.bootstrap import bootstrap
    from service.local import EmbeddedAws

    from .aws import AwsStack, aws_stack, demo_secrets, dynalite, fauxqs, moto_process
    from .courier import CourierProcess, courier_process
    from .events import seal_events, send_events
    from .haproxy import HAProxy, TargetGroup, haproxy, target_group_from_terraform
    from .ports import bound_port, free_port, serving
    from .processes import HarnessError, ManagedProcess, managed, python_env, wait_http
    from .proxy import CountingProxy, counter_delta, counting_proxy
    from .sampling import ProcessSampler, machine
    from .stubs import EffectRecorder, StubIdm, StubProcess, StubTarget, stub_process
    from .tcpproxy import TcpProxy, tcp_proxy
    from .tinyproxy import TinyProxy, tinyproxy
    from .tls import LocalTls, local_tls
    from .tokens import mint_token

# module -> the names it gives the kit's API. Imported on first use, so that
# ``python -m courier_testkit.<module>`` and the strict layer inside moto's process do not load
# the whole kit.
_MODULES = {
    "service.bootstrap": "bootstrap",
    "service.local": "EmbeddedAws",
    ".aws": "AwsStack aws_stack demo_secrets dynalite fauxqs moto_process",
    ".courier": "CourierProcess courier_process",
    ".haproxy": "HAProxy TargetGroup haproxy target_group_from_terraform",
    ".events": "seal_events send_events",
    ".ports": "bound_port free_port serving",
    ".processes": "HarnessError ManagedProcess managed python_env wait_http",
    ".proxy": "CountingProxy counter_delta counting_proxy",
    ".sampling": "ProcessSampler machine",
    ".stubs": "EffectRecorder StubIdm StubProcess StubTarget stub_process",
    ".tcpproxy": "TcpProxy tcp_proxy",
    ".tinyproxy": "TinyProxy tinyproxy",
    ".tls": "LocalTls local_tls",
    ".tokens": "mint_token",
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names.split()}

__all__ = [
    "AwsStack",
    "CountingProxy",
    "CourierProcess",
    "EffectRecorder",
    "EmbeddedAws",
    "HAProxy",
    "HarnessError",
    "LocalTls",
    "ManagedProcess",
    "ProcessSampler",
    "StubIdm",
    "StubProcess",
    "StubTarget",
    "TargetGroup",
    "TcpProxy",
    "TinyProxy",
    "aws_stack",
    "bootstrap",
    "bound_port",
    "counter_delta",
    "counting_proxy",
    "courier_process",
    "demo_secrets",
    "dynalite",
    "fauxqs",
    "free_port",
    "haproxy",
    "local_tls",
    "machine",
    "managed",
    "mint_token",
    "moto_process",
    "python_env",
    "seal_events",
    "send_events",
    "serving",
    "stub_process",
    "target_group_from_terraform",
    "tcp_proxy",
    "tinyproxy",
    "wait_http",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
