"""The fault and load scenarios, one module each. Each returns rows (``chaos.report.Row``) with
its invariants checked; ``Scale`` sets the sizes (``SMALL`` for ``make test``, ``FULL`` for
``make chaos``). Every scenario is a ``common.Scenario`` in five steps, in this order: setup,
load, fault, recover, check.

1. crash      -- SIGKILL of worker processes under load, twice, each restarted.
2. outage     -- a legacy target failing 20% of calls and down for a window.
3. poison     -- 1% poison of every kind among healthy messages, against a clean run.
4. aws        -- SQS, KMS and DynamoDB unreachable in turn, under load.
5. graceful   -- SIGTERM to one of two processes sharing a port, under load.
6. soak       -- sustained load; RSS, open fds and event-loop lag sampled (full run only).
7. legacy     -- three workers against a legacy system with real capacity: adaptive limits,
                 capacity halved, 429 + Retry-After, a fleet-wide cap.

``common`` holds what several share (sizes, fleets, metrics, the load accounting) and
``planted`` the messages put straight on the queue (sealed, or poison of six kinds).
"""

from __future__ import annotations

from chaos.scenarios import aws, crash, graceful, legacy, outage, poison, soak
from chaos.scenarios.common import FULL, SMALL, Run, Scale

SCENARIOS: dict[str, Run] = {
    "crash": crash.run,
    "outage": outage.run,
    "poison": poison.run,
    "aws": aws.run,
    "graceful": graceful.run,
    "soak": soak.run,
    "legacy": legacy.run,
}

__all__ = ["FULL", "SCENARIOS", "SMALL", "Run", "Scale"]
