"""Memory of THIS process (not the system's): resident set and its peak, and GPU memory.

Linux keeps the peak resident set (`VmHWM` in /proc/self/status) and lets a process reset it
(writing 5 to /proc/self/clear_refs), so the peak of one phase — generation after loading — can be
read exactly, without sampling. Elsewhere `resource.getrusage` gives the peak since start.

GPU memory is read per process from `nvidia-smi` while a GPU backend runs; on CPU it is skipped.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from nvlm_export.runtime import nvidia_smi

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
RESET_PEAK = "5"  # proc(5): "5" resets the peak resident set size ("high water mark")


def _status_kib(field: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])  # "VmHWM:   123456 kB"
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    """Resident memory of this process now (0 where the platform does not say)."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else 0


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since start or the last `reset_peak_rss()`."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes, Linux: KiB


def reset_peak_rss() -> bool:
    """Start a new peak from the current resident size; False where the OS cannot (peak then
    covers the whole process life, an over-estimate)."""
    try:
        CLEAR_REFS.write_text(RESET_PEAK)
    except OSError:
        return False
    return True


class CallPeaks:
    """Time and peak memory of single calls inside a phase whose own peak is read at its end.

    Each call's peak is measured from a reset, so it is what the call added on top of the
    resident size it started from; those resets would lose the peak the phase reached before
    them, so it is kept here and `phase_peak()` is the true one.
    """

    def __init__(self) -> None:
        self.resettable = reset_peak_rss()
        self._seen = 0

    def measure(self, call: Callable[[], object]) -> tuple[float, int | None]:
        """Seconds `call` took and the bytes its peak rose above the resident size it started
        from (None where the OS cannot reset the peak)."""
        self._seen = max(self._seen, peak_rss_bytes())
        start_rss = current_rss_bytes()
        reset = reset_peak_rss()
        start = time.perf_counter()
        call()
        seconds = time.perf_counter() - start
        return seconds, max(peak_rss_bytes() - start_rss, 0) if reset else None

    def phase_peak(self) -> int:
        return max(self._seen, peak_rss_bytes())


def gpu_memory_bytes(pid: int | None = None) -> int | None:
    """GPU memory used by process `pid` (default: this one) per nvidia-smi; None if unknown."""
    out = nvidia_smi.query("compute-apps", ("pid", "used_memory"), timeout=5)
    if out is None:
        return None
    pid = os.getpid() if pid is None else pid
    used = [
        int(mib) * 1024 * 1024
        for row_pid, mib in (line.split(",")[:2] for line in out.splitlines() if "," in line)
        if row_pid.strip() == str(pid) and mib.strip().isdigit()
    ]
    return sum(used) if used else None


class PeakSampler:
    """Calls `probe()` every `interval` seconds in a background thread and keeps the largest value
    (for quantities the OS does not track a peak of, such as GPU memory)."""

    def __init__(self, probe: Callable[[], int | None], interval: float = 0.25) -> None:
        self.probe = probe
        self.interval = interval
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="peak-sampler", daemon=True)

    def _loop(self) -> None:
        while True:
            self._take()
            if self._stop.wait(self.interval):
                return

    def _take(self) -> None:
        value = self.probe()
        if value is not None and (self.peak is None or value > self.peak):
            self.peak = value

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()  # one last reading: the end state counts too
