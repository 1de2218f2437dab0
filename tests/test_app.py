"""The daemon's operational surface over real HTTP: /healthz, /readyz, /metrics, errors, drain."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from courier_testkit.ports import free_port, serving
from service import daemon
from service.errors import ListenError
from service.net import bound_port
from service.settings import Settings, load_settings, to_toml


def on_free_port(settings: Settings) -> Settings:
    """The API alone (the worker needs targets) on any free port."""
    return settings.replace(
        role="api", http=dataclasses.replace(settings.http, port=0, drain_seconds=2)
    )


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def wait_ready(
    http: aiohttp.ClientSession, url: str, timeout: float = 10
) -> dict[str, object]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        async with http.get(f"{url}/readyz") as response:
            body: dict[str, object] = await response.json()
            if response.status == 200:
                return body
        assert asyncio.get_running_loop().time() < deadline, body
        await asyncio.sleep(0.05)


async def test_health_ready_and_metrics(settings: Settings, http: aiohttp.ClientSession) -> None:
    async with daemon.serving(on_free_port(settings)) as listening:
        async with http.get(f"{listening.url}/healthz") as response:
            assert response.status == 200
            assert await response.json() == {"status": "ok"}
        body = await wait_ready(http, listening.url)
        assert body["checks"] == {"draining": "ok", "secrets": "ok", "aws": "ok"}
        async with http.get(f"{listening.url}/metrics") as response:
            text = await response.text()
            assert response.headers["Content-Type"].startswith("text/plain")
        assert "courier_ready 1.0" in text
        assert 'courier_http_requests_total{method="GET",route="/healthz",status="200"}' in text
        assert "courier_secret_lookups_total" in text


async def test_not_ready_while_a_required_secret_is_missing(
    settings: Settings, http: aiohttp.ClientSession
) -> None:
    idm = dataclasses.replace(settings.idm, api_key_secret="no.such.secret")
    async with daemon.serving(on_free_port(settings.replace(idm=idm))) as listening:
        await asyncio.sleep(0.3)
        async with http.get(f"{listening.url}/readyz") as response:
            assert response.status == 503
            body = await response.json()
        assert body["status"] == "not ready"
        assert body["checks"]["secrets"] == "failing"


def probe_failures(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    """The ``fields`` of every readiness_probe_failed log record."""
    return [
        fields
        for record in caplog.records
        if (fields := getattr(record, "fields", {})).get("event") == "readiness_probe_failed"
    ]


async def test_not_ready_when_aws_is_unreachable(
    settings: Settings, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="courier.health")
    aws = dataclasses.replace(
        settings.aws,
        endpoint_url="http://127.0.0.1:9",
        connect_timeout_seconds=0.2,
        read_timeout_seconds=1,
    )
    async with daemon.serving(on_free_port(settings.replace(aws=aws))) as listening:
        async with http.get(f"{listening.url}/readyz") as response:
            assert response.status == 503
            body = await response.json()
        assert body["checks"]["aws"] == "failing"
    # The reason is for operators, in the log: not in the body.
    [failure] = probe_failures(caplog)
    assert failure["check"] == "aws"
    assert str(failure["error"]).startswith("EndpointConnectionError")


ROLE_ARN = "arn:aws:sts::123456789012:assumed-role/courier-instance/i-0123456789abcdef0"
DENIED = (
    f"User: {ROLE_ARN} is not authorized to perform: sqs:getqueueattributes on resource: "
    "arn:aws:sqs:eu-west-1:123456789012:courier-work because no identity-based policy allows it"
)


@pytest.fixture
async def denying_sqs() -> AsyncIterator[str]:
    """An SQS endpoint that refuses every call the way AWS does for a role without permission."""

    async def deny(_: web.Request) -> web.Response:
        body = {"__type": "com.amazonaws.sqs#AccessDenied", "message": DENIED}
        return web.json_response(
            body,
            status=403,
            content_type="application/x-amz-json-1.0",
            headers={"x-amzn-query-error": "AccessDenied;Sender"},
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", deny)
    async with serving(app) as url:
        yield url


async def test_readyz_never_shows_aws_error_text_or_the_role_arn(
    settings: Settings,
    http: aiohttp.ClientSession,
    denying_sqs: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="courier.health")
    aws = dataclasses.replace(settings.aws, sqs_endpoint_url=denying_sqs)
    async with daemon.serving(on_free_port(settings.replace(aws=aws))) as listening:
        for _ in range(3):  # the failed probe is cached for a while; the answer stays the same
            async with http.get(f"{listening.url}/readyz") as response:
                assert response.status == 503
                text = await response.text()
            body = json.loads(text)
            assert body["status"] == "not ready"
            assert body["checks"]["aws"] == "failing"
            assert set(body["checks"].values()) <= {"ok", "failing"}
            for leak in ("arn:aws", "123456789012", "AccessDenied", "not authorized", "Error"):
                assert leak not in text, f"/readyz leaks {leak!r}: {text}"
    failures = probe_failures(caplog)
    assert len(failures) == 1, "a failure that does not change is logged once"
    assert ROLE_ARN in str(failures[0]["error"])


async def test_unknown_route_is_problem_json_with_request_id(
    settings: Settings, http: aiohttp.ClientSession
) -> None:
    async with daemon.serving(on_free_port(settings)) as listening:
        async with http.get(
            f"{listening.url}/nope", headers={"X-Request-Id": "abc-123"}
        ) as response:
            assert response.status == 404
            assert response.headers["Content-Type"] == "application/problem+json"
            assert response.headers["X-Request-Id"] == "abc-123"
            body = await response.json()
        assert body == {
            "type": "urn:courier:problem:not-found",
            "title": "Not Found",
            "status": 404,
            "detail": "404: Not Found",
            "request_id": "abc-123",
        }
        async with http.post(
            f"{listening.url}/healthz", headers={"X-Request-Id": "bad id with spaces"}
        ) as response:
            assert response.status == 405
            assert response.headers["Allow"] == "GET,HEAD"
            assert response.headers["X-Request-Id"] != "bad id with spaces"


async def test_metrics_port_serves_only_metrics(
    settings: Settings, http: aiohttp.ClientSession
) -> None:
    free = free_port()
    http_settings = dataclasses.replace(settings.http, port=0, metrics_port=free)
    async with daemon.serving(settings.replace(role="api", http=http_settings)) as listening:
        assert listening.metrics_url == f"http://127.0.0.1:{free}/metrics"
        async with http.get(listening.metrics_url) as response:
            assert response.status == 200
        async with http.get(f"http://127.0.0.1:{free}/healthz") as response:
            assert response.status == 404


async def test_a_metrics_port_in_use_is_one_line_naming_the_setting(settings: Settings) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        held = holder.getsockname()[1]
        http_settings = dataclasses.replace(settings.http, port=0, metrics_port=held)
        with pytest.raises(ListenError) as refused:
            async with daemon.serving(settings.replace(role="api", http=http_settings)):
                pass
    assert str(refused.value) == (
        f"127.0.0.1:{held} is in use by another process: stop that process,"
        " or change [http] metrics_port + instance (COURIER_HTTP_METRICS_PORT)"
    )


async def test_an_address_not_on_this_machine_is_one_line_naming_the_setting(
    settings: Settings,
) -> None:
    http_settings = dataclasses.replace(settings.http, host="192.0.2.1", port=8080)
    with pytest.raises(ListenError) as refused:
        async with daemon.serving(settings.replace(role="api", http=http_settings)):
            pass
    assert str(refused.value) == (
        "192.0.2.1:8080 is not an address of this machine: change the host beside"
        " [http] port (COURIER_HTTP_PORT, or courier local --port; 0 = any free port)"
    )


async def test_stop_event_ends_run(settings: Settings) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(on_free_port(settings), stop))
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.wait_for(task, 5)


def test_local_settings_round_trip_through_toml(tmp_path: object, settings: Settings) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "local.toml"
    path.write_text(to_toml(settings))
    assert load_settings(path, environ={}) == settings


def test_the_worker_role_needs_targets_and_a_dlq(settings: Settings) -> None:
    from service.app import create_app
    from service.errors import SettingsError

    with pytest.raises(
        SettingsError, match=r"^targets: the worker needs at least one \[\[targets\]\] entry$"
    ):
        create_app(settings.replace(role="worker"))
    queue = dataclasses.replace(settings.queue, dlq_url="")
    with pytest.raises(
        SettingsError, match=r"^queue.dlq_url \(COURIER_QUEUE_DLQ_URL\) is required"
    ):
        create_app(settings.replace(role="all", queue=queue))
    queue = dataclasses.replace(settings.queue, url="")
    with pytest.raises(SettingsError, match=r"^queue.url \(COURIER_QUEUE_URL\) is required"):
        create_app(settings.replace(role="api", queue=queue))


async def test_bound_port_is_the_port_a_site_given_port_0_answers_on(
    http: aiohttp.ClientSession,
) -> None:
    async def here(_: web.Request) -> web.Response:
        return web.Response(text="here")

    app = web.Application()
    app.router.add_get("/", here)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        with pytest.raises(RuntimeError, match="start it first"):
            bound_port(site)
        await site.start()
        async with http.get(f"http://127.0.0.1:{bound_port(site)}/") as response:
            assert await response.text() == "here"
    finally:
        await runner.cleanup()
