"""tinyproxy (Debian's, 1.11) as an instance's egress proxy: ``HTTPS_PROXY=http://user:pw@...``.

``tinyproxy()`` writes a configuration (loopback only, Basic authentication, every CONNECT port
allowed), starts ``tinyproxy -d`` on a free port and yields a ``TinyProxy``; it is stopped on
exit. ``requests()`` reads what it forwarded from its log: ``CONNECT localhost:8443`` for an
HTTPS endpoint, ``POST http://...`` for a plain one.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from .ports import LOOPBACK, free_port
from .processes import ManagedProcess, managed, wait_http

__all__ = ["TinyProxy", "tinyproxy", "tinyproxy_binary"]

USER = "courier"
PASSWORD = "egress-pw"  # noqa: S105 - the test proxy's own
_REQUEST = re.compile(r"Request \(file descriptor \d+\): (\S+ \S+) HTTP/")


def tinyproxy_binary() -> str | None:
    """The ``tinyproxy`` executable, or None."""
    return shutil.which("tinyproxy")


@dataclass(frozen=True)
class TinyProxy:
    """A running tinyproxy: ``url`` carries the credentials, ``address`` does not."""

    process: ManagedProcess
    address: str
    url: str

    def requests(self) -> list[str]:
        """Every request it was asked to forward, as ``"METHOD target"``, oldest first."""
        return _REQUEST.findall(self.process.stdout() + self.process.stderr())


@contextlib.asynccontextmanager
async def tinyproxy() -> AsyncIterator[TinyProxy]:
    """A tinyproxy on 127.0.0.1 that lets through only ``USER`` / ``PASSWORD``."""
    binary = tinyproxy_binary()
    if binary is None:
        raise RuntimeError("tinyproxy is not installed (apt-get install tinyproxy)")
    directory = Path(tempfile.mkdtemp(prefix="courier-tinyproxy-"))
    port = free_port()
    config = directory / "tinyproxy.conf"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                f"Listen {LOOPBACK}",
                f"Allow {LOOPBACK}",
                "Timeout 600",
                "MaxClients 200",
                "LogLevel Connect",  # one line per request forwarded
                f"BasicAuth {USER} {PASSWORD}",
                "DisableViaHeader Yes",
                "",
            ]
        )
    )
    async with managed([binary, "-d", "-c", str(config)], name="tinyproxy") as process:
        address = f"http://{LOOPBACK}:{port}"
        # It answers a request that names no upstream, without credentials, with 401.
        await wait_http(address, process=process, ok=(400, 401, 407))
        yield TinyProxy(process, address, f"http://{USER}:{PASSWORD}@{LOOPBACK}:{port}")
