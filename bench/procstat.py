"""What a process costs, from /proc: CPU seconds, resident memory, and core pinning."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Sequence

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time (all threads) the processes have used so far."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLK_TCK


def rss_mib(pids: Sequence[int]) -> float:
    """Resident memory (VmRSS) of the processes together, MiB."""
    total_kib = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total_kib += int(line.split()[1])
                        break
        except OSError:
            continue
    return total_kib / 1024


class PeakRSS:
    """Samples the processes' summed RSS every `interval` seconds while in a `with`."""

    def __init__(self, pids: Sequence[int], interval: float = 0.1):
        self.pids = list(pids)
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib(self.pids))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib(self.pids))


def can_pin() -> bool:
    """Two cores or more, and taskset available: proxies on core 1, load on core 0."""
    return (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None


def pin(pid: int, core: int) -> None:
    """Pin every thread of a running process to one core."""
    subprocess.run(
        ["taskset", "-a", "-p", "-c", str(core), str(pid)], check=True, capture_output=True
    )


def pinned(args: list[str], core: int | None) -> list[str]:
    """`args` prefixed to run on one core (unchanged when pinning is off)."""
    return ["taskset", "-c", str(core), *args] if core is not None else args
