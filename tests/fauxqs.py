"""fauxqs as a pytest plugin: ``pytest_plugins = ("tests.fauxqs",)`` in a test module.

Session fixtures: ``fauxqs_endpoint`` (the URL) and ``fauxqs_server`` (URL, pid, CPU time). The
launcher is the test kit's (``courier_testkit.fauxqs``). When Node >= 22.5 or
``node_modules/fauxqs`` is missing, the fixture fails, naming the make step that installs
them: CI must run these tests, never skip them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from courier_testkit.fauxqs import FauxqsServer, FauxqsUnavailableError, running_fauxqs

__all__ = ["FauxqsServer", "fauxqs_endpoint", "fauxqs_server"]


@pytest.fixture(scope="session")
def fauxqs_server() -> Iterator[FauxqsServer]:
    """fauxqs for the whole session; a missing Node or npm package fails the test, loudly."""
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(running_fauxqs())
        except FauxqsUnavailableError as exc:
            problem = str(exc)
        else:
            problem = ""
        if problem:  # failed outside the except block, so the report shows the message once
            pytest.fail(problem, pytrace=False)
        yield server


@pytest.fixture(scope="session")
def fauxqs_endpoint(fauxqs_server: FauxqsServer) -> str:
    """fauxqs's endpoint URL (http://127.0.0.1:<port>), for ``aws.sqs_endpoint_url``."""
    return fauxqs_server.endpoint_url
