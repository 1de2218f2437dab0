"""The API bench counts requests at the server, the same way for courier and the bare peer.

wrk stops with requests in flight that the server still finishes; their CPU falls in the
measured window, so the per-request CPU must divide by what the server answered, not by what
wrk saw answered (which overstated CPU per request by up to ``connections`` requests).
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import pytest

from bench import api
from courier_testkit.processes import managed, python_env


def test_cpu_per_request_divides_by_what_the_server_answered() -> None:
    before = {"at": 0.0, "cpu": 1.0, "proxy": {}, "served": 100.0, "secret_fetches": 0.0,
              "servers_cpu": {}}  # fmt: skip
    after = {**before, "at": 2.0, "cpu": 3.0, "served": 1100.0}
    found = api._per_request(before, after)
    assert found["served"] == 1000
    assert found["server_cpu_s_per_1000"] == pytest.approx(2.0)
    assert found["server_cpu_share"] == pytest.approx(1.0)


async def test_the_bare_peer_counts_the_posts_it_answered() -> None:
    argv = [sys.executable, "-m", "bench.peers.bare_api"]
    async with managed(argv, name="bare", env=python_env()) as process:
        found = await process.wait_for_output(r"listening (http://127\.0\.0\.1:\d+)")
        url = found[1]
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.post(url + "/v1/mailboxes", json={}) as response:
                    assert response.status == 202
        assert await api.served(url, process) == (3.0, 0.0)
        assert await asyncio.wait_for(api.quiet(url, process, timeout=5), 10) < 5
