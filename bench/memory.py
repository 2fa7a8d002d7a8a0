"""Resident-memory measurements of the current process.

`RssSampler` reads the resident set size from `/proc/self/statm` on a background thread every few
milliseconds while a block of work runs, so the peak of that block is known separately from what
imports, model loading and compilation left behind. Both implementations release the GIL while
they compute, so the thread keeps sampling. `ru_maxrss` (the kernel's lifetime peak of the
process, imports and compilation included) is reported next to it.
"""

from __future__ import annotations

import os
import resource
import threading

_PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 2**20


def rss_bytes() -> int:
    """The current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def max_rss_bytes() -> int:
    """The process's lifetime peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssSampler:
    """Samples the resident set size between `start()` and `stop()`; use as a context manager.

    Attributes:
      start_bytes: RSS when sampling began.
      peak_bytes: the largest RSS seen (at least `start_bytes` and the RSS at `stop()`).
    """

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.start_bytes = 0
        self.peak_bytes = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._done.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, rss_bytes())

    def __enter__(self) -> RssSampler:
        self.start_bytes = self.peak_bytes = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, rss_bytes())

    def to_dict(self) -> dict:
        return {"start_mib": self.start_bytes / MIB, "peak_mib": self.peak_bytes / MIB}
