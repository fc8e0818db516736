"""Peak resident memory of benchmark processes, measured so that a fresh process reports its own.

getrusage's ``ru_maxrss`` is kept across ``exec`` on Linux: a process started by a big one
(the benchmark itself) reports the big one's peak if its own is lower. Linux's ``VmHWM``
(the high-water mark of the process's own memory) does not. Standard library only, so
importing it adds nothing to the memory it measures.
"""

from __future__ import annotations

import resource
import threading
from pathlib import Path
from typing import Self


def peak_rss_mb(pid: int | str = "self") -> float:
    """A process's peak resident memory in MB: Linux's VmHWM, else getrusage's maximum.

    Not ru_maxrss on Linux: it is kept across exec, so a fresh process started by a big one
    reports the big one's peak.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if pid == "self" else float("nan")


class ChildPeakMemory:
    """Samples the peak resident memory of this process's child processes (the store writer) while it runs."""

    def __init__(self, every_s: float = 0.02) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(every_s,), daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            for children in Path("/proc/self/task").glob("*/children"):
                for pid in children.read_text().split():
                    self.peak_mb = max(self.peak_mb, peak_rss_mb(pid))
