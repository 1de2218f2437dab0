"""The worker half of courier: receive messages from SQS, turn each into an outcome, apply it.

``poller.Poller`` coordinates ``receive`` (long-polls within the in-flight bound), ``dispatch`` (a
task per message, FIFO groups in order), ``acknowledge`` (delete, retry later, release, dead-letter)
and ``heartbeat`` (keep slow messages invisible). ``pipeline.Pipeline`` turns one ``Message`` into one
``outcomes.Outcome``: it opens the envelope and calls the legacy systems through ``targets`` and
``circuit``. ``dlq`` moves poison messages aside; ``replay`` moves them back.
"""
