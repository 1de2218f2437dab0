"""A fleet on one machine: two courier instances behind HAProxy, the ALB stand-in configured from
terraform/alb.tf's target group, replaced one at a time under steady load as an instance
refresh with the lifecycle hook does (``python -m fleet --quick``; ``make fleet`` runs the
full version and prints the tables).

HAProxy comes from Debian (.ci/run installs it); the .tf files are parsed in .venv-hcl2, which
``make terraform-check`` creates before ``make pytest`` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from chaos.load import Load
from chaos.rig import rig
from courier_testkit.haproxy import (
    HealthCheck,
    TargetGroup,
    haproxy,
    haproxy_binary,
    render_config,
    status_rule,
    target_group_from_terraform,
)
from courier_testkit.iam_policy import ParserUnavailable, TerraformModule, load_module
from courier_testkit.ports import bound_port
from fleet import report, rolling

pytestmark = pytest.mark.timeout(180)
needs_haproxy = pytest.mark.skipif(
    haproxy_binary() is None, reason="haproxy is not installed (apt-get install haproxy)"
)


@pytest.fixture(scope="module")
def terraform() -> TerraformModule:
    try:
        return load_module()
    except ParserUnavailable as exc:
        pytest.skip(str(exc))


def test_alb_matchers_become_haproxy_expect_rules() -> None:
    assert status_rule("200") == "status 200"
    assert status_rule("200,202") == "rstatus ^(200|202)$"
    assert status_rule("200-202") == "rstatus ^(200|201|202)$"
    with pytest.raises(ValueError, match="200 to 499"):
        status_rule("503")


def test_haproxy_checks_and_drains_as_the_target_group_in_terraform(
    terraform: TerraformModule,
) -> None:
    declared = terraform.resources[("aws_lb_target_group", "api")]
    check = declared["health_check"][0]
    group = target_group_from_terraform(terraform)
    health = group.health_check
    assert (health.path, health.matcher) == (check["path"], check["matcher"])
    assert health.interval_seconds == check["interval"]
    assert health.timeout_seconds == check["timeout"]
    assert health.healthy_threshold == check["healthy_threshold"]
    assert health.unhealthy_threshold == check["unhealthy_threshold"]
    # deregistration_delay = var.drain_seconds: its default, or the value given.
    assert group.deregistration_delay_seconds == terraform.variables["drain_seconds"]["default"]
    changed = target_group_from_terraform(terraform, variables={"drain_seconds": 7})
    assert changed.deregistration_delay_seconds == 7

    config = render_config(group, 8080, Path("/run/admin.sock"), {"i1": "127.0.0.1:9000"})
    interval_ms = round(check["interval"] * 1000)
    expected_server = (
        f"server i1 127.0.0.1:9000 check inter {interval_ms}ms"
        f" rise {check['healthy_threshold']} fall {check['unhealthy_threshold']}"
    )
    assert expected_server in config
    assert f"timeout check {round(check['timeout'] * 1000)}ms" in config
    assert f"uri {check['path']} " in config
    assert "retries 0" in config  # the ALB does not retry a failed request either


@needs_haproxy
async def test_a_load_balancers_own_503_page_counts_as_a_503_not_as_no_answer() -> None:
    # With no target in service HAProxy answers 503 with an HTML page, as the ALB does; the
    # load generator must count the status, not the body it cannot parse as JSON.
    async with haproxy(TargetGroup()) as lb:
        load = Load([lb.url], "token", run="lb503", rate=10, count=2, retry_seconds=0)
        result = await load.run_all()
        counters = await lb.counters()
    assert result.answers() == {"503": 2}
    assert [r.status for r in result.requests] == [503, 503]
    assert counters["alb.hrsp_5xx"] == 2


@contextlib.asynccontextmanager
async def _target(ready: bool) -> AsyncIterator[str]:
    """A target answering /readyz (200 or 503) and anything else 200; yields host:port."""

    async def readyz(_: web.Request) -> web.Response:
        return web.Response(status=200 if ready else 503)

    async def anything(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/readyz", readyz)
    app.router.add_route("*", "/{tail:.*}", anything)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"127.0.0.1:{bound_port(site)}"
    finally:
        await runner.cleanup()


@needs_haproxy
async def test_a_registered_target_gets_requests_only_after_the_healthy_threshold() -> None:
    # HAProxy puts a server leaving maintenance UP before any check: register must not.
    fast = TargetGroup(HealthCheck("/readyz", "200", 0.5, 0.5, 2, 3), 1.0)
    async with (
        _target(True) as first,
        _target(False) as unready,
        haproxy(fast, {"old": first}) as lb,
        aiohttp.ClientSession() as session,
    ):
        await lb.wait_healthy("old")
        await lb.register("new", unready)
        assert (await lb.server("new")).status.startswith("DOWN")
        for _ in range(10):
            async with session.get(lb.url + "/x") as response:
                assert response.status == 200
        await asyncio.sleep(1.5)  # three checks, each answered 503
        new = await lb.server("new")
        assert new.status.startswith("DOWN")
        assert new.total == 0
        deregistered = await lb.deregister("old")
        assert not deregistered.timed_out
        assert (await lb.server("old")).status == "MAINT"


@needs_haproxy
async def test_rolling_replacement_fails_no_request_and_loses_no_message(
    terraform: TerraformModule,
) -> None:
    async with rig() as running:
        outcome = await rolling.run(running, rolling.QUICK)
    shown = report.text(outcome)
    row = outcome.row
    assert row.violations == [], shown
    assert outcome.failed_attempts() == dict.fromkeys(
        ("connection_errors", "http_503", "http_5xx_other", "other_not_202"), 0
    ), shown
    assert row.requests == row.accepted == row.delivered > 0, shown
    assert row.lost == row.duplicate_effects == 0, shown
    # Both original instances were replaced, one at a time, by new ones that then served.
    assert [r.replaced for r in outcome.rounds] == ["i1", "i2"], shown
    assert [r.launched for r in outcome.rounds] == ["i3", "i4"], shown
    assert set(outcome.served) == {"i3", "i4"}, shown
    assert all(total > 0 for total in outcome.served.values()), shown
    for done in outcome.rounds:
        assert done.exit_code == 0, shown
        assert not done.orphaned, shown
        assert done.messages_received > 0, shown
