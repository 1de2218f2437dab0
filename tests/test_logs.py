"""JSON logs: one object per line, context fields, exceptions summarised."""

from __future__ import annotations

import asyncio
import io
import json
import logging

from service.logs import JsonFormatter, log_context, set_process_fields, setup_logging


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


def test_timestamps_are_utc_milliseconds_across_second_boundaries() -> None:
    formatter = JsonFormatter()
    stamps = []
    for created in (1_700_000_000.9994, 1_700_000_001.0004, 1_700_000_000.5, 1_700_003_600.25):
        record = logging.LogRecord("courier.test", logging.INFO, __file__, 1, "m", (), None)
        record.created = created
        stamps.append(json.loads(formatter.format(record))["ts"])
    assert stamps == [
        "2023-11-14T22:13:20.999Z",
        "2023-11-14T22:13:21.000Z",
        "2023-11-14T22:13:20.500Z",
        "2023-11-14T23:13:20.250Z",
    ]
