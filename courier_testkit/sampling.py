"""CPU time and memory of processes (Linux ``/proc``), and a description of the machine."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid`` (all its threads) so far; 0.0 once it is gone."""
    try:
        fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_ns(pid: int) -> dict[int, int]:
    """Each live thread of ``pid`` -> the CPU time the scheduler has given it so far, in ns.

    ``cpu_seconds`` counts in clock ticks (10 ms): too coarse for an idle process, which may
    use one tick in half a minute. ``/proc/<pid>/task/<tid>/schedstat`` starts with the
    thread's time on a CPU in ns. Empty once the process is gone.
    """
    found: dict[int, int] = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            found[int(stat.parent.name)] = int(stat.read_text().split()[0])
    return found


def cpu_seconds_between(before: Mapping[int, int], after: Mapping[int, int]) -> float:
    """CPU seconds the threads of ``after`` used since ``before`` (two ``thread_cpu_ns``).

    Per thread, so a thread that ended in between subtracts nothing (its last moments are
    not counted) and one that started in between counts whole.
    """
    return sum(ns - before.get(tid, 0) for tid, ns in after.items()) / 1e9


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
