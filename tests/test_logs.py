"""JSON logs: one object per line, context fields, exceptions summarised."""

from __future__ import annotations

import asyncio
import io
import json
import logging

from service.logs import log_context, set_process_fields, setup_logging


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_one_json_object_per_line_with_context() -> None:
    stream = io.StringIO()
    setup_logging("INFO", stream)
    log = logging.getLogger("courier.test")
    set_process_fields(instance_id="i-123")
    with log_context(request_id="r-1"):
        log.info("hello %s", "world", extra={"fields": {"event": "greeting"}})
    log.debug("hidden")
    log.warning("multi\nline")
    first, second = lines(stream)
    assert first["message"] == "hello world"
    assert first["level"] == "INFO"
    assert first["logger"] == "courier.test"
    assert first["request_id"] == "r-1"
    assert first["event"] == "greeting"
    assert first["instance_id"] == "i-123"
    assert str(first["ts"]).endswith("Z")
    assert "request_id" not in second
    assert second["message"] == "multi\nline"


def test_context_follows_tasks() -> None:
    stream = io.StringIO()
    setup_logging("INFO", stream)
    log = logging.getLogger("courier.test")

    async def work() -> None:
        log.info("inside")

    async def main() -> None:
        with log_context(message_id="m-9"):
            await asyncio.create_task(work())

    asyncio.run(main())
    assert lines(stream)[0]["message_id"] == "m-9"


def test_exception_is_summarised() -> None:
    stream = io.StringIO()
    setup_logging("INFO", stream)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("courier.test").exception("failed")
    entry = lines(stream)[0]
    assert entry["error"] == "ValueError: boom"
    assert "Traceback" in str(entry["traceback"])
