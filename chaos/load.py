"""Open-loop create-mailbox load, as a well-behaved client sends it.

Request ``i`` leaves at ``start + i / rate`` whatever happened to earlier ones (a slow server
does not slow the offered load). Each request carries its own ``Idempotency-Key``; on a 503,
a 5xx, a 409 (request in progress), a timeout or a refused connection the client retries with
the same key (after ``Retry-After``) until ``retry_seconds`` have passed, so a request that was accepted once is
never sent under another key. Every attempt's answer is recorded: the scenarios count 5xx
and 503 answers and client-side errors (no answer at all), and check that every request
answered 202 was delivered.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from chaos.rig import REJECT_MARKER

REQUEST_TIMEOUT_SECONDS = 10.0
RETRY_PAUSE_SECONDS = 0.5


def username(run: str, index: int, poison: bool = False) -> str:
    """A valid, unique username; poison ones carry the marker a stub refuses with 400."""
    return f"{REJECT_MARKER if poison else 'c'}{run}{index:06d}"


def body(run: str, index: int, poison: bool = False) -> dict[str, Any]:
    return {
        "username": username(run, index, poison),
        "display_name": f"Chaos User {index}",
        "plan": ("basic", "standard", "premium")[index % 3],
        "contact_email": f"chaos{index}@example.com",
    }


async def _json_or_none(response: aiohttp.ClientResponse) -> Any:
    """The body as JSON; None when it is not (a load balancer's own error page): the attempt
    still counts by its status, not as a request that got no answer."""
    try:
        return await response.json(content_type=None)
    except ValueError:
        return None


@dataclass
class Request:
    """One logical request and what became of it."""

    index: int
    key: str
    username: str
    poison: bool = False
    status: int = 0  # the final answer (0: never answered)
    request_id: str = ""
    attempts: int = 0
    answers: list[str] = field(default_factory=list)  # every attempt: status or error name
    answered_at: list[float] = field(default_factory=list)  # monotonic, one per answer
    sent_at: float = 0.0
    accepted_at: float = 0.0  # monotonic time of the 202
    latency: float = 0.0  # of the attempt that got the final answer
    final_started: float = 0.0  # monotonic start of that attempt


@dataclass
class LoadResult:
    requests: list[Request]
    started: float
    finished: float

    @property
    def accepted(self) -> list[Request]:
        return [r for r in self.requests if r.status == 202]

    def answers(self) -> Counter[str]:
        """Every attempt's answer, counted: '202', '503', 'ClientConnectorError', ..."""
        return Counter(answer for r in self.requests for answer in r.answers)

    def server_errors(self, since: float = 0.0, until: float = float("inf")) -> int:
        """5xx answers other than 503 (503 + Retry-After is the documented 'try later')."""
        return sum(
            1
            for r in self.requests
            for a in r.answers
            if a.isdigit() and int(a) >= 500 and a != "503"
        )

    def client_errors(self) -> Counter[str]:
        """Attempts that got no HTTP answer, by exception name: a dropped, reset or refused
        connection, a timeout, a cut body. Unlike a 503, the client cannot tell whether the
        server acted on them (only the Idempotency-Key of its retry makes that safe)."""
        return Counter(a for r in self.requests for a in r.answers if not a.isdigit())

    def latencies(self) -> list[float]:
        return sorted(r.latency for r in self.accepted)


class Load:
    """Sends ``count`` requests at ``rate`` per second to ``urls`` (round robin)."""

    def __init__(
        self,
        urls: Sequence[str],
        token: str,
        *,
        run: str,
        rate: float,
        count: int,
        poison_every: int = 0,
        retry_seconds: float = 60.0,
        max_concurrency: int = 1000,
        on_answer: Callable[[Request, str], None] | None = None,
    ) -> None:
        self.urls = list(urls)
        self.token = token
        self.run = run
        self.rate = rate
        self.count = count
        self.poison_every = poison_every
        self.retry_seconds = retry_seconds
        self._limit = asyncio.Semaphore(max_concurrency)
        self.on_answer = on_answer
        self.requests = [
            Request(
                index=i,
                key=f"{run}-{i}",
                username=username(run, i, self._is_poison(i)),
                poison=self._is_poison(i),
            )
            for i in range(count)
        ]

    def _is_poison(self, index: int) -> bool:
        return bool(self.poison_every) and index % self.poison_every == self.poison_every - 1

    async def run_all(self) -> LoadResult:
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            started = time.monotonic()
            tasks = []
            for request in self.requests:
                due = started + request.index / self.rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(self._send(session, request)))
            await asyncio.gather(*tasks)
        return LoadResult(self.requests, started, time.monotonic())

    async def _send(self, session: aiohttp.ClientSession, request: Request) -> None:
        async with self._limit:
            request.sent_at = time.monotonic()
            deadline = request.sent_at + self.retry_seconds
            headers = {"Authorization": f"Bearer {self.token}", "Idempotency-Key": request.key}
            payload = body(self.run, request.index, request.poison)
            while True:
                url = self.urls[(request.index + request.attempts) % len(self.urls)]
                request.attempts += 1
                attempt_started = time.monotonic()
                pause = RETRY_PAUSE_SECONDS
                try:
                    async with session.post(
                        f"{url}/v1/mailboxes", json=payload, headers=headers
                    ) as response:
                        document = await _json_or_none(response)
                        answer = str(response.status)
                        pause = float(response.headers.get("Retry-After", pause))
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    answer, document = type(exc).__name__, None
                request.answers.append(answer)
                request.answered_at.append(time.monotonic())
                if self.on_answer is not None:
                    self.on_answer(request, answer)
                # 409 is request-in-progress: an earlier attempt under this key (one the client
                # gave up on) still holds its claim; the README says retry after Retry-After.
                retryable = not answer.isdigit() or int(answer) >= 500 or answer == "409"
                if not retryable or time.monotonic() + pause > deadline:
                    request.status = int(answer) if answer.isdigit() else 0
                    request.latency = time.monotonic() - attempt_started
                    request.final_started = attempt_started
                    if request.status == 202 and isinstance(document, dict):
                        request.request_id = str(document.get("request_id", ""))
                        request.accepted_at = time.monotonic()
                    return
                await asyncio.sleep(pause)
