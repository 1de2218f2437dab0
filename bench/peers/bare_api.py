"""The framework ceiling: an aiohttp handler that reads the body and answers 202, nothing else.

Same server setup as courier's API (aiohttp on uvloop, no access log); ``GET /_served`` is
how many it answered. Prints
``listening http://127.0.0.1:<port>``; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import uuid

from aiohttp import web

from service.net import bound_port

SERVED = web.AppKey("served", list)


async def create(request: web.Request) -> web.Response:
    await request.read()
    request.app[SERVED][0] += 1
    request_id = uuid.uuid4().hex
    return web.json_response(
        {"request_id": request_id, "status": "accepted"},
        status=202,
        headers={"Location": f"/v1/requests/{request_id}"},
    )


async def served(request: web.Request) -> web.Response:
    """How many POSTs were answered: the bench counts requests at the server for every variant."""
    return web.json_response({"served": request.app[SERVED][0]})


async def serve(port: int) -> None:
    app = web.Application()
    app[SERVED] = [0]
    app.router.add_post("/v1/mailboxes", create)
    app.router.add_get("/_served", served)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = bound_port(site)
    print(f"listening http://127.0.0.1:{bound}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    import uvloop

    uvloop.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
