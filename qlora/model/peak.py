"""Measure a process's peak resident memory growth with the kernel's high-water mark.

    start = reset_peak()            # after imports: VmHWM := VmRSS (writes 5 to /proc/self/clear_refs)
    ...                             # the work
    grown = peak_bytes() - start    # growth of the peak over the post-import footprint

Linux only; used by the load-memory test and benchmarks/load.py in fresh subprocesses.
"""
from __future__ import annotations


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> int:
    """Reset the high-water mark to the current RSS; return that RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS") * 1024


def peak_bytes() -> int:
    """The high-water mark of resident memory (VmHWM) in bytes."""
    return _status_kb("VmHWM") * 1024
