"""Torch's CPU thread count, following the cores that other processes leave free.

Torch's OpenMP threads meet at a barrier after every parallel operation, so when another process
takes one of the cores they run on, each barrier waits for the thread the kernel has set aside.
Measured on 2 cores with one core kept busy by another process (bench/RESULTS.md): 2 threads ran
the toy step ~4x slower than on the idle machine, 1 thread at full single-core speed, and a
passive OpenMP wait policy in between, at a ~25 % cost on the idle machine. So a CPU run starts
with its OMP_NUM_THREADS threads and, every few seconds, uses one thread per core not taken by
other processes (never fewer than 1, never more than it started with).

A change of thread count changes the summation order inside some CPU kernels: results agree to
float rounding, not bit for bit (tests run with one thread, which never changes). Linux only
(/proc); elsewhere `CpuThreads.poll` never changes anything.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

# /proc/stat's first line: user nice system idle iowait irq softirq steal (in clock ticks).
_IDLE_FIELDS = (3, 4)
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)


def machine_ticks() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all cores since boot, or None without /proc/stat."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(value) for value in handle.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = sum(fields[i] for i in _BUSY_FIELDS)
    return busy, busy + sum(fields[i] for i in _IDLE_FIELDS)


def _process_ticks(pid: int) -> tuple[int, int] | None:
    """(user + system ticks, parent pid) of one process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            # The command name (field 2) may hold spaces: the fields after it follow the last ')'.
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12]), int(fields[1])


def own_ticks(pid: int | None = None) -> int:
    """User + system ticks of this process and its children (e.g. data loader workers)."""
    pid = os.getpid() if pid is None else pid
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        found = _process_ticks(int(entry))
        if found is not None and (int(entry) == pid or found[1] == pid):
            total += found[0]
    return total


def threads_for_free_cores(cores: int, others: float, max_threads: int) -> int:
    """One thread per core that other processes leave free (rounded), between 1 and max_threads."""
    return max(1, min(max_threads, round(cores - others)))


class CpuThreads:
    """Adjusts torch.set_num_threads to the free cores; call `poll()` between steps of work.

    Must run on the thread that runs the model: OpenMP's thread count belongs to the thread
    that sets it. `poll` reads /proc at most every `interval` seconds; between two readings the
    cores used by other processes are the machine's busy ticks minus this process tree's own.
    """

    def __init__(self, max_threads: int | None = None, interval: float = 5.0,
                 cores: int | None = None, on_change: Callable[[int, int, float], None] | None = None,
                 read_machine: Callable[[], tuple[int, int] | None] = machine_ticks,
                 read_own: Callable[[], int] = own_ticks, clock: Callable[[], float] = time.monotonic):
        self.max_threads = max_threads or torch.get_num_threads()
        self.cores = cores or os.cpu_count() or 1
        self.interval = interval
        self.on_change = on_change
        self._read_machine, self._read_own, self._clock = read_machine, read_own, clock
        self._last = self._reading()

    def _reading(self):
        machine = self._read_machine()
        return None if machine is None else (self._clock(), machine, self._read_own())

    def poll(self) -> int:
        """The thread count now in use (changed if the free cores changed)."""
        current = torch.get_num_threads()
        if self._last is None or self._clock() - self._last[0] < self.interval:
            return current
        now = self._reading()
        if now is None:
            return current
        (_, (busy0, total0), own0), (_, (busy1, total1), own1) = self._last, now
        self._last = now
        if total1 <= total0:
            return current
        # Ticks are counted over all cores: the share of the machine, times its cores.
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (total1 - total0) * self.cores
        wanted = threads_for_free_cores(self.cores, others, self.max_threads)
        if wanted != current:
            torch.set_num_threads(wanted)
            if self.on_change is not None:
                self.on_change(current, wanted, others)
        return wanted
