"""Shared fixtures: one moto server per session, bootstrapped resources, fresh queues per test."""

from __future__ import annotations

import fnmatch
import itertools
import os
from collections.abc import AsyncIterator, Generator, Iterator

import pytest

from courier_testkit.strict import ActionRecorder, StrictWsgi
from service.aws import AwsClients, open_clients
from service.bootstrap import ResourceNames, Resources, bootstrap
from service.local import EmbeddedAws, use_fake_credentials
from service.settings import AwsSettings, Settings, load_settings

DEMO_SECRETS = {
    "courier.jwt.hs256": "test-hs256-key-0123456789abcdef0123456789abcdef",
    "courier.idm.api_key": "test-idm-api-key",
}
_counter = itertools.count()


@pytest.fixture(scope="session", autouse=True)
def _fake_aws_credentials() -> None:
    """botocore's fake credentials, set before the first test. A test that sets its own with
    monkeypatch then restores these afterwards; set later, by the first moto user, they could
    be the ones a module's monkeypatch deleted on teardown, failing whatever read them next."""
    use_fake_credentials()


@pytest.fixture(scope="session")
def aws_calls() -> ActionRecorder:
    """Every AWS call made to the session's moto, per access key, and the strict layer's
    refusals (``courier_testkit.strict.ActionRecorder``)."""
    return ActionRecorder()


@pytest.fixture(scope="session")
def moto_endpoint(aws_calls: ActionRecorder) -> Iterator[str]:
    """moto's server on 127.0.0.1, shared by the whole session, behind the strict layer that
    refuses what real AWS refuses (``courier_testkit.aws_limits``) and records every call."""
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with EmbeddedAws(wsgi_middleware=lambda app: StrictWsgi(app, aws_calls)) as server:
        yield server.endpoint_url


@pytest.fixture(scope="session")
def aws_settings(moto_endpoint: str) -> AwsSettings:
    return AwsSettings(region="us-east-1", endpoint_url=moto_endpoint, read_timeout_seconds=25)


@pytest.fixture(scope="session")
async def aws(aws_settings: AwsSettings) -> AsyncIterator[AwsClients]:
    """Shared aiobotocore clients talking to moto over HTTP."""
    async with open_clients(aws_settings) as clients:
        yield clients


@pytest.fixture(scope="session")
async def resources(aws: AwsClients) -> Resources:
    """The session's bootstrapped queues, tables, keys and demo secrets."""
    return await bootstrap(aws, ResourceNames(prefix="session"), DEMO_SECRETS)


@pytest.fixture
async def fresh(aws: AwsClients) -> Resources:
    """Resources with a fresh queue pair for one test (moto slows as a queue fills up)."""
    names = ResourceNames(prefix=f"t{os.getpid()}-{next(_counter)}")
    return await bootstrap(aws, names, DEMO_SECRETS)


@pytest.fixture
def settings(aws_settings: AwsSettings, fresh: Resources) -> Settings:
    """Settings pointed at moto and this test's fresh resources."""
    # Tests stop their daemon right after their last request: a short close grace keeps the
    # stop quick (http.close_grace_seconds waits for keep-alive connections in use to go idle).
    base = load_settings(environ={"COURIER_HTTP_CLOSE_GRACE_SECONDS": "0.1"}).replace(
        aws=aws_settings
    )
    return fresh.apply_to(base)


@pytest.fixture(autouse=True)
def _release_stopped_apps() -> Iterator[None]:
    """aiohttp memoises middleware chains per app in a module-level LRU (1024 entries) that
    keeps every stopped app, and its AWS clients, alive; with an app per test the heap grows
    until full GC pauses take seconds. Production runs one app, so this is test-only."""
    yield
    from aiohttp import web_app

    web_app._cached_build_middleware.cache_clear()


# --- CI: a skip fails the run, unless it is allowed here with its reason ----------------------
# With `CI` set (CI services set it), a test that skips fails instead, so CI cannot go green
# while a check is silently skipped because a tool is missing (systemd-analyze, packer, ...):
# .ci/run installs the tools. Allowed here, node id pattern (fnmatch) -> why, is only what a
# CI machine cannot offer; they are printed at the end of every CI run. Tests deselected with
# -m (provisioning) and xfails are not skips.
CI_ALLOWED_SKIPS: dict[str, str] = {}
_allowed_skips: list[tuple[str, str, str]] = []  # (pattern, node id, reason it skipped)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _fail_unallowed_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail") or not _in_ci():
        return
    longrepr = report.longrepr
    reason = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)
    reason = reason.removeprefix("Skipped: ")
    for pattern in CI_ALLOWED_SKIPS:
        if fnmatch.fnmatchcase(report.nodeid, pattern):
            _allowed_skips.append((pattern, report.nodeid, reason))
            return
    report.outcome = "failed"
    report.longrepr = (
        f"skipped: {reason}\nCI is set and this skip is not allowed: install what the test"
        " needs in .ci/run, or allow it with a reason in CI_ALLOWED_SKIPS (tests/conftest.py)"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport() -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """In CI, a test's skip (marker or pytest.skip) fails unless allowed."""
    report = yield
    _fail_unallowed_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report() -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """In CI, a whole module's skip (pytest.skip(allow_module_level=True)) fails unless allowed."""
    report = yield
    _fail_unallowed_skip(report)
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """In CI, every allowed skip pattern with its reason, and the tests it let skip."""
    if not _in_ci():
        return
    terminalreporter.section("skips allowed in CI (CI_ALLOWED_SKIPS in tests/conftest.py)")
    if not CI_ALLOWED_SKIPS:
        terminalreporter.write_line("none: every skip fails the run")
    for pattern, why in CI_ALLOWED_SKIPS.items():
        terminalreporter.write_line(f"{pattern}: {why}")
        for matched, nodeid, reason in _allowed_skips:
            if matched == pattern:
                terminalreporter.write_line(f"    {nodeid}: {reason}")
