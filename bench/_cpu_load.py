"""Other processes' CPU use during a benchmark (Linux /proc/stat), so a timing taken while the
machine was busy with something else can be seen, waited out, or flagged.

    with ForeignCPU() as f:
        ...                      # the timed work: this process and its children
    f.cores                      # average cores used by everything else meanwhile
"""

from __future__ import annotations

import os
import resource
import time

_TICK = os.sysconf("SC_CLK_TCK")


def _busy_seconds() -> float:
    """CPU seconds all processes spent busy since boot (user+nice+system+irq+softirq+steal)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _TICK


def _own_seconds() -> float:
    """CPU seconds of this process and its finished children."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class ForeignCPU:
    """Average number of cores used by other processes while the block ran."""

    def __enter__(self):
        self._t, self._busy, self._own = time.perf_counter(), _busy_seconds(), _own_seconds()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self._t
        foreign = (_busy_seconds() - self._busy) - (_own_seconds() - self._own)
        self.cores = max(0.0, foreign) / max(wall, 1e-9)
        return False


def wait_for_quiet(max_cores: float = 0.2, probe_s: float = 2.0, timeout_s: float = 120.0) -> float:
    """Wait (at most timeout_s) until other processes use under max_cores over a probe_s window;
    return the last measured value."""
    deadline = time.perf_counter() + timeout_s
    while True:
        with ForeignCPU() as f:
            time.sleep(probe_s)
        if f.cores < max_cores or time.perf_counter() > deadline:
            return f.cores
