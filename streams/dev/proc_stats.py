"""CPU time and memory of another process, read from Linux's /proc.

The bench and the soak report the embedded broker's CPU and RSS beside the
worker's: Tansu's memory storage slows as it fills (docs/embedded-broker.md),
so a number that moved because the broker did must be told from one that moved
because the worker did.  Linux only (the bench's platform); elsewhere
:func:`sample` returns None and the reports show "-".
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

__all__ = ["ProcSample", "available_memory_bytes", "cpu_share", "sample"]

#: Clock ticks per second of /proc/<pid>/stat's utime and stime.
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True, slots=True)
class ProcSample:
    """One reading of a process: when (monotonic seconds), CPU seconds used so far, resident bytes."""

    at_s: float
    cpu_s: float
    rss_bytes: int


def sample(pid: int) -> ProcSample | None:
    """The process's CPU seconds (user + system) and RSS now; None when it is gone or /proc is absent."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/statm", "rb") as f:
            statm = f.read().split()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields after its last ')' are fixed.
    fields = stat[stat.rindex(b")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])
    return ProcSample(time.monotonic(), (utime + stime) / _TICKS, int(statm[1]) * _PAGE)


def cpu_share(start: ProcSample | None, end: ProcSample | None) -> float | None:
    """CPU used between two samples of one process, as a share of one core (1.0 = one core busy)."""
    if start is None or end is None or end.at_s <= start.at_s:
        return None
    return (end.cpu_s - start.cpu_s) / (end.at_s - start.at_s)


def available_memory_bytes() -> int | None:
    """The kernel's estimate of memory available to new work (MemAvailable), None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
