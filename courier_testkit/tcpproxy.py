"""A TCP proxy on 127.0.0.1 that can be cut and restored, to make a dependency unreachable.

``cut()`` closes the listening socket and aborts every relayed connection, so clients get
"connection refused" (new connections) or a reset (connections in use): what an outage of
SQS, DynamoDB or KMS looks like from courier's side. ``restore()`` listens again on the same
port. The proxy forwards bytes unchanged; it runs in the caller's event loop.
``response_delay`` holds every chunk from the backend that long (a response in flight).
Given a server ``tls`` context it terminates TLS (``https://localhost:<port>``) and forwards
the plain bytes: an HTTPS endpoint in front of an emulator that speaks HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator
from urllib.parse import urlparse

READ_CHUNK = 65536


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``backend`` (a URL) until ``cut``; ``url`` is its address."""

    def __init__(
        self, backend: str, name: str = "proxy", tls: ssl.SSLContext | None = None
    ) -> None:
        parsed = urlparse(backend)
        self.name = name
        self._tls = tls
        self._backend = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._port = 0
        self.url = ""
        self.cuts: list[tuple[float, float | None]] = []  # (cut at, restored at), monotonic
        self.accepted = 0  # connections accepted (and, with TLS, handshaken)
        # Seconds every chunk from the backend waits before it reaches the client: a response
        # the backend already committed to (e.g. messages SQS handed to a receive) is in flight
        # that long.
        self.response_delay = 0.0

    @property
    def is_cut(self) -> bool:
        return self._server is None and bool(self._port)

    async def start(self) -> str:
        """Listen (first on a free port, later on the same one); returns ``http://127.0.0.1:<port>``
        (``https://localhost:<port>`` with TLS: the name its certificate carries)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self._port))
        self._server = await asyncio.start_server(
            self._accept, sock=sock, backlog=1024, ssl=self._tls
        )
        self._port = sock.getsockname()[1]
        self.url = (
            f"https://localhost:{self._port}" if self._tls else f"http://127.0.0.1:{self._port}"
        )
        return self.url

    async def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.cuts.append((time.monotonic(), None))

    async def restore(self) -> None:
        """Listen again on the same port."""
        if self._server is None:
            await self.start()
            if self.cuts and self.cuts[-1][1] is None:
                self.cuts[-1] = (self.cuts[-1][0], time.monotonic())

    async def close(self) -> None:
        """Stop for good (a cut that is not restored)."""
        await self.cut()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:
            writer.transport.abort()
            return
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._backend)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer, delayed=True)),
        ]
        self._tasks.update(pipes)
        try:
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            self._tasks.difference_update(pipes)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delayed: bool = False
    ) -> None:
        try:
            while data := await reader.read(READ_CHUNK):
                if delayed and self.response_delay:
                    await asyncio.sleep(self.response_delay)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()
            self._writers.discard(writer)


@contextlib.asynccontextmanager
async def tcp_proxy(
    backend: str, name: str = "proxy", tls: ssl.SSLContext | None = None
) -> AsyncIterator[TcpProxy]:
    """A started ``TcpProxy``, closed on exit."""
    proxy = TcpProxy(backend, name, tls)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
