"""courier's shared test kit: what tests/, bench/ and chaos/ use to stand in for AWS and friends.

Not shipped in the wheel (``service*`` only): importable from the repository root, which
pytest, ``python -m bench`` and ``python -m chaos`` put on ``sys.path``.

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
- ``bench/proxy.py`` (the counting proxy of bench and chaos) enforces the same rules through
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
"""
