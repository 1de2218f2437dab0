"""Boot a directory tree with systemd as PID 1 (``systemd-nspawn``), run commands in it, read its journal.

What an image build leaves in a root directory (tests/test_provisioning.py's provisioned
Debian root) boots as a machine would::

    with booted(root) as machine:          # systemd-nspawn -D root --boot ..., up to "running"
        machine.systemctl("start", "courier.target")
        machine.show("courier@1.service", "ActiveState", "StatusText")
        machine.run("cat", "/etc/os-release").stdout
        machine.journal("-u", "courier@1.service", "-o", "cat")
        machine.poweroff()                 # systemctl poweroff inside; nspawn's exit status

How, and why so (checked on a host without systemd as PID 1, cgroup v1 + v2 hybrid):

- ``--register=no --keep-unit``: there is no machined or system bus to register with
  ("Failed to open system bus" otherwise). ``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`` gives the
  machine a clean cgroup v2 tree.
- Network is shared with the host (no ``--private-network``): a port open inside is open on
  the host's 127.0.0.1 and the machine reaches the host's loopback servers. Two machines, or a
  machine and the host, therefore cannot both listen on one port.
- nspawn makes ``payload/`` and ``supervisor/`` cgroups where it runs. Each boot runs it in a
  cgroup of its own (``courier-nspawn-<pid>``) in every named/unified hierarchy, so two
  machines booting at once never share a cgroup, and that whole subtree is removed after
  nspawn exits.
- Commands run inside with ``nsenter --target <PID 1> --all``: the machine's mount, PID, UTS,
  IPC, network and cgroup namespaces, its root, a clean environment. There is no
  ``machinectl``/``systemd-run --machine`` without registration.
- The journal stays in the root (``--link-journal=no``); ``journal()`` reads it from the host
  with ``journalctl -D ROOT/var/log/journal``, also after the machine stopped.

Every machine still running at interpreter exit is killed (``kill_all``), so a failed test
never leaves one serving ports on the host.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "BOOT_TIMEOUT_SECONDS",
    "CONTAINER_PATH",
    "BootError",
    "Machine",
    "booted",
    "kill_all",
    "missing_tools",
    "top_cgroups",
    "wait_for",
]

T = TypeVar("T")

BOOT_TIMEOUT_SECONDS = 90.0
STOP_TIMEOUT_SECONDS = 120.0
POLL_SECONDS = 0.2
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CGROUP_ROOT = Path("/sys/fs/cgroup")
NSPAWN_ENV = {"SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
# Lines nspawn prints on every run on such a host, harmless.
HARMLESS_CONSOLE_LINES = ("/run/systemd/nspawn/propagate",)

_running: dict[int, int] = {}  # nspawn pid -> the machine's PID 1 (0: not known yet)


class BootError(RuntimeError):
    """The machine did not boot, a command inside failed, or it did not stop in time."""


def missing_tools() -> str | None:
    """Why machines cannot boot here (not root, a tool missing), or None when they can."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, nsenter)"
    for tool, package in (("systemd-nspawn", "systemd-container"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            return f"needs {tool} (Debian package: {package})"
    if shutil.which("journalctl") is None:
        return "needs journalctl (Debian package: systemd)"
    return None


def wait_for(
    condition: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    poll: float = POLL_SECONDS,
) -> T:
    """Poll ``condition`` until it returns something truthy, and return that; ``BootError``
    naming ``what`` (and the last value seen) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        last = condition()
        if last:
            return last
        if time.monotonic() > deadline:
            raise BootError(f"{what}: not within {timeout:g}s (last: {last!r})")
        time.sleep(poll)


@dataclass
class Machine:
    """A booted root: ``root`` on the host, nspawn's process, and the machine's PID 1 (``leader``,
    a host pid)."""

    root: Path
    process: subprocess.Popen[bytes]
    leader: int
    console_path: Path

    # --- inside ---------------------------------------------------------------------------

    def run(
        self,
        *command: str,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` as root inside the machine, with a clean environment (``env`` added)."""
        variables = {"PATH": CONTAINER_PATH, "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", **(env or {})}
        argv = [
            "nsenter", f"--target={self.leader}", "--all", "--root", "--wd",
            "env", "-i", *(f"{key}={value}" for key, value in variables.items()), *command,
        ]  # fmt: skip
        result = subprocess.run(  # noqa: S603 - argv is the kit's own
            argv, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise BootError(
                f"{' '.join(command)} exited {result.returncode} inside {self.root}:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        """``systemctl --no-pager ARGS`` inside; its stdout."""
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout).stdout

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """``systemctl show -p P1,P2 UNIT`` as a dict (every property when none are named)."""
        args = ["show", unit] + ([f"--property={','.join(properties)}"] if properties else [])
        found: dict[str, str] = {}
        for line in self.systemctl(*args).splitlines():
            key, sep, value = line.partition("=")
            if sep:
                found[key] = value
        return found

    def state(self) -> str:
        """``systemctl is-system-running``: initializing, starting, running, degraded, ..."""
        return self.systemctl("is-system-running", check=False).strip()

    def wait_running(self, timeout: float = BOOT_TIMEOUT_SECONDS) -> str:
        """Wait until boot is over (``running``, or ``degraded``: some unit failed); return it."""

        def settled() -> str | None:
            if not self.alive():
                raise BootError(f"nspawn exited {self.process.returncode}:\n{self.console()}")
            state = self.state()
            return state if state in ("running", "degraded") else None

        return wait_for(settled, timeout=timeout, what=f"{self.root} booting")

    def host_pid(self, pid: int) -> int:
        """The host's pid of the machine's process ``pid`` (a ``MainPID``), to read its /proc."""
        namespace = os.stat(f"/proc/{self.leader}/ns/pid").st_ino
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if (entry / "ns" / "pid").stat().st_ino != namespace:
                    continue
                for line in (entry / "status").read_text().splitlines():
                    if line.startswith("NSpid:") and line.split()[-1] == str(pid):
                        return int(entry.name)
        raise BootError(f"no process {pid} inside {self.root}")

    def path(self, inside: str) -> Path:
        """Where a path of the machine is on the host (``/etc/x`` -> ``ROOT/etc/x``)."""
        return self.root / inside.lstrip("/")

    # --- outside --------------------------------------------------------------------------

    def journal(self, *args: str, timeout: float = 60) -> str:
        """``journalctl -D ROOT/var/log/journal --no-pager ARGS``, run on the host."""
        directory = f"--directory={self.path('/var/log/journal')}"
        result = subprocess.run(  # noqa: S603 - the host's journalctl, from PATH
            ["journalctl", directory, "--no-pager", *args],  # noqa: S607
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise BootError(f"journalctl {' '.join(args)}: {result.stderr}")
        return result.stdout

    def journal_entries(self, *args: str) -> list[dict[str, Any]]:
        """The journal's entries (``-o json``) matching ``args``, as dicts."""
        text = self.journal("--output=json", *args)
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def console(self) -> str:
        """What nspawn and the machine printed on the console (``--console=pipe``)."""
        text = self.console_path.read_text(errors="replace")
        return "\n".join(
            line for line in text.splitlines() if not any(h in line for h in HARMLESS_CONSOLE_LINES)
        )

    def alive(self) -> bool:
        """Whether nspawn (and so the machine) still runs."""
        return self.process.poll() is None

    def poweroff(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int:
        """``systemctl poweroff`` inside, then nspawn's exit status (0: a clean shutdown)."""
        # --no-block: systemctl itself is killed with everything else as the machine stops.
        self.run("systemctl", "poweroff", "--no-block", check=False)
        return self.wait_exit(timeout)

    def wait_exit(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int:
        """nspawn's exit status once it has ended; ``BootError`` after ``timeout``."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise BootError(f"{self.root} did not stop within {timeout:g}s") from None


# --- booting ---------------------------------------------------------------------------------


def _cgroup_hierarchies() -> list[Path]:
    """Where nspawn may make cgroups: cgroup v2 (pure or hybrid ``unified``) and v1 name=systemd."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT]
    return [CGROUP_ROOT / name for name in ("unified", "systemd") if (CGROUP_ROOT / name).is_dir()]


def top_cgroups() -> set[Path]:
    """The cgroups right under each hierarchy's root: a boot must leave none behind
    (nspawn's ``payload/`` and ``supervisor/``, or this module's ``courier-nspawn-*``)."""
    return {path for top in _cgroup_hierarchies() for path in top.iterdir() if path.is_dir()}


def _own_cgroups(tag: str) -> list[Path]:
    made = []
    for hierarchy in _cgroup_hierarchies():
        path = hierarchy / tag
        path.mkdir(exist_ok=True)
        made.append(path)
    return made


def _remove_cgroups(paths: Sequence[Path], timeout: float = 10) -> None:
    """rmdir each cgroup tree, deepest first (a cgroup goes only once its processes have)."""
    deadline = time.monotonic() + timeout
    for top in paths:
        if not top.exists():
            continue
        tree = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for path in [*tree, top]:
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)


def _status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict ({} once the process is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def _find_leader(process: subprocess.Popen[bytes], timeout: float) -> int:
    """The machine's systemd: PID 1 of a new PID namespace, started by nspawn (its child, or
    a grandchild until nspawn's intermediate process exits)."""

    def descends_from_nspawn(pid: int) -> bool:
        for _ in range(3):
            pid = int(_status(pid).get("PPid", "0"))
            if pid == process.pid:
                return True
        return False

    def leader() -> int | None:
        if process.poll() is not None:
            raise BootError(f"systemd-nspawn exited {process.returncode} before booting")
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                nspid = _status(int(entry.name)).get("NSpid", "").split()
                if len(nspid) > 1 and nspid[-1] == "1" and descends_from_nspawn(int(entry.name)):
                    return int(entry.name)
        return None

    return wait_for(leader, timeout=timeout, what="the machine's PID 1", poll=0.05)


def _stop(machine: Machine, cgroups: Sequence[Path], timeout: float) -> None:
    """Power the machine off; failing that SIGTERM nspawn (it powers off too), then SIGKILL."""
    try:
        if machine.alive():
            with contextlib.suppress(BootError, subprocess.TimeoutExpired):
                machine.poweroff(timeout)
        if machine.alive():
            machine.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                machine.process.wait(30)
        if machine.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(machine.leader, signal.SIGKILL)  # PID 1 of its namespace: all of it
            machine.process.kill()
            machine.process.wait(30)
    finally:
        _running.pop(machine.process.pid, None)
        _remove_cgroups(cgroups)


@contextlib.contextmanager
def booted(
    root: Path,
    *,
    args: Sequence[str] = (),
    boot_timeout: float = BOOT_TIMEOUT_SECONDS,
    stop_timeout: float = STOP_TIMEOUT_SECONDS,
    wait: bool = True,
    console_path: Path | None = None,
) -> Iterator[Machine]:
    """``root`` booted with systemd as PID 1; powered off (or killed) on exit, cgroups removed.

    ``wait``: return once boot is over (``running`` or ``degraded``), else as soon as PID 1
    exists. ``args`` go to systemd-nspawn (``--setenv=...``, ``--bind-ro=...``). The console
    goes to ``console_path`` (default: ``ROOT.console.log`` next to the root).
    """
    reason = missing_tools()
    if reason:
        raise BootError(reason)
    console_path = console_path or root.with_name(root.name + ".console.log")
    tag = f"courier-nspawn-{os.getpid()}-{time.monotonic_ns()}"
    cgroups = _own_cgroups(tag)
    # Enter our own cgroups before exec: nspawn makes payload/ and supervisor/ in them.
    enter = "".join(f'echo $$ >"{path}/cgroup.procs" && ' for path in cgroups)
    nspawn = [
        "systemd-nspawn", f"--directory={root}", "--boot", "--console=pipe",
        "--register=no", "--keep-unit", "--link-journal=no", *args,
    ]  # fmt: skip
    with console_path.open("wb") as console:
        process = subprocess.Popen(  # noqa: S603 - the host's sh, from PATH
            ["sh", "-c", enter + 'exec "$@"', "nspawn", *nspawn],  # noqa: S607
            env={**os.environ, **NSPAWN_ENV},
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _running[process.pid] = 0
    machine: Machine | None = None
    try:
        machine = Machine(root, process, _find_leader(process, boot_timeout), console_path)
        _running[process.pid] = machine.leader
        if wait:
            machine.wait_running(boot_timeout)
        yield machine
    finally:
        if machine is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)
            _running.pop(process.pid, None)
            _remove_cgroups(cgroups)
        else:
            _stop(machine, cgroups, stop_timeout)


def kill_all() -> None:
    """SIGKILL every nspawn this module started that still runs (at interpreter exit)."""
    for pid, leader in list(_running.items()):
        for kill, target in ((os.kill, leader), (os.killpg, pid)):  # PID 1 takes its namespace
            if target:
                with contextlib.suppress(ProcessLookupError):
                    kill(target, signal.SIGKILL)
        _running.pop(pid, None)


atexit.register(kill_all)
