"""CPU time and memory of processes (Linux ``/proc``), and a description of the machine."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid`` (all its threads) so far; 0.0 once it is gone."""
    try:
        fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


def scheduled_cpu_seconds(pid: int) -> float:
    """CPU time the scheduler gave ``pid``'s live threads so far, to the nanosecond.

    ``cpu_seconds`` counts in clock ticks (10 ms): too coarse for an idle process, which may
    use one tick in half a minute. ``/proc/<pid>/task/*/schedstat`` starts with each thread's
    time on a CPU in ns; a thread that has ended is no longer counted. 0.0 once it is gone.
    """
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            total += int(stat.read_text().split()[0])
    return total / 1e9


def memory_bytes(pid: int) -> dict[str, int]:
    """``rss`` and ``peak_rss`` (VmRSS, VmHWM) of ``pid`` in bytes; zeros once it is gone."""
    wanted = {"VmRSS": "rss", "VmHWM": "peak_rss"}
    found = dict.fromkeys(wanted.values(), 0)
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return found
    for line in lines:
        key, _, value = line.partition(":")
        if key in wanted:
            found[wanted[key]] = int(value.split()[0]) * 1024
    return found


class ProcessSampler:
    """``pid``, ``cpu_seconds()`` and ``memory()`` of one process.

    Every handle of a running process (``ManagedProcess``, ``Server``, ``StubProcess``,
    ``CountingProxy``, ``CourierProcess``) is one: those with a ``process`` attribute sample
    that process; ``ProcessSampler(pid)`` samples any pid.
    """

    process: Any  # anything with a ``pid``; set by subclasses (dataclass fields)

    def __init__(self, pid: int) -> None:
        self._pid = pid

    @property
    def pid(self) -> int:
        """The sampled process's id."""
        if "_pid" in vars(self):
            return int(self._pid)
        return int(self.process.pid)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds so far (0.0 once the process is gone)."""
        return cpu_seconds(self.pid)

    def memory(self) -> dict[str, int]:
        """``rss`` and ``peak_rss`` in bytes (zeros once the process is gone)."""
        return memory_bytes(self.pid)


def machine() -> dict[str, Any]:
    """The machine a result was measured on: CPU model, cores, memory, kernel, Python."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(memory_kb / 1024 / 1024, 1),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
    }
