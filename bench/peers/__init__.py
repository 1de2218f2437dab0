"""The consumers courier is compared with, each a small program run in its own process.

- ``naive``: a synchronous boto3 loop (receive 1, three calls one after another, delete 1);
- ``sqs_consumer.mjs``: Node's bbc/sqs-consumer (batchSize 10, the three calls concurrently);
- ``ceiling``: aiobotocore receive(10) + DeleteMessageBatch loops, no processing at all;
- ``bare_api``: an aiohttp handler answering 202, the HTTP framework's ceiling.

None of them decrypts the envelope or writes a status record: they forward the body as is,
which favours them. Each sends ``Idempotency-Key: <request_id>:<target>`` so the stubs can
tell when a message reached its last target.
"""
