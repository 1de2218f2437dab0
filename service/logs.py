"""JSON logs: one object per line, with the context of the request or message being handled.

Context (``request_id``, ``message_id``, ...) lives in a ContextVar so every line logged
while handling a request carries it without being passed around. Callers log structured
fields with ``extra={"fields": {...}}``; payload plaintext and secrets are never passed in.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import logging
import sys
import time
import types
from collections.abc import Mapping
from typing import Any, TextIO

_EMPTY: Mapping[str, Any] = types.MappingProxyType({})
_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "courier_log_context", default=_EMPTY
)
# Fields added to every line of this process (instance id, availability zone, role).
_static: dict[str, Any] = {}


class _LogContext:
    # A plain context manager: a generator-based one costs about 2 µs more per message.
    __slots__ = ("_fields", "_token")

    def __init__(self, fields: dict[str, Any]) -> None:
        self._fields = fields

    def __enter__(self) -> None:
        self._token = _context.set({**_context.get(), **self._fields})

    def __exit__(self, *_: object) -> None:
        _context.reset(self._token)


def log_context(**fields: Any) -> contextlib.AbstractContextManager[None]:
    """Add ``fields`` to every log line emitted inside the block (and tasks it starts)."""
    return _LogContext(fields)


def bind_context(**fields: Any) -> None:
    """Add ``fields`` to the current context until it ends (for a request handler's task)."""
    _context.set({**_context.get(), **fields})


def set_process_fields(**fields: Any) -> None:
    """Fields carried by every line of this process, e.g. ``instance_id``."""
    _static.update({k: v for k, v in fields.items() if v})


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: ts, level, logger, message, context, fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_static)
        entry.update(_context.get())
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            entry.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
            entry["traceback"] = self.formatException(record.exc_info)
        return _encode(entry)


# One encoder for every line: ``json.dumps`` with options builds a new one per call.
_encode = json.JSONEncoder(default=str, ensure_ascii=False).encode


def _iso(created: float) -> str:
    return f"{_whole_second(int(created))}.{int(created % 1 * 1000):03d}Z"


@functools.lru_cache(maxsize=4)
def _whole_second(seconds: int) -> str:
    # strftime once per second, not once per line.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


class _RedactRefusedRequests(logging.Filter):
    """aiohttp logs a refused request (header line too long, bad syntax) with a traceback that
    quotes the raw line, which may be a bearer token: keep the fact, drop the bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.msg, record.args = (
                "refused a malformed HTTP request (%s)",
                (type(error).__name__,),
            )
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def setup_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Route every logger through one JSON handler on stderr (journald takes it from there)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # JsonFormatter writes none of the thread, process or multiprocessing names; not looking
    # them up saves about 6 µs a line (the logging HOWTO's "Optimization" switches).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _RedactRefusedRequests) for f in server_log.filters):
        server_log.addFilter(_RedactRefusedRequests())
    # Library chatter at INFO says nothing an operator needs; keep their warnings.
    for noisy in ("botocore", "aiobotocore", "urllib3", "werkzeug", "moto"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
