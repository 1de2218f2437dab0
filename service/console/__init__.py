"""The operator console: server-rendered pages on their own port, for a ``mailbox:admin`` token.

- ``app``: wiring; ``server``: the listener (``serving_console``), started by the daemon when
  ``console.enabled``;
- ``auth``: sign-in (token → cookie), CSRF, the audit log line;
- ``views/``: one module per page (overview, targets, dead letters, requests, secrets);
- data: ``sampler`` (the process's counters, a 15-minute ring buffer), ``queues`` (SQS depth,
  CloudWatch ages), ``deadletters`` (the DLQ read and grouped), ``secretinfo``;
- ``actions``: replay and discard, through ``service.worker.replay`` like ``courier replay``;
- ``masking``: personal fields of a decrypted event.
"""

from .server import serving_console

__all__ = ["serving_console"]
