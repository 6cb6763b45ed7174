"""Keep freed activations from staying resident on CPU (glibc's malloc tuning).

    return_freed_memory()      # once, before training on the CPU (the trainer does it)

glibc serves blocks above M_MMAP_THRESHOLD with mmap and gives them back to the kernel on
free. The threshold starts at 128 KiB but is dynamic: each time a large mmapped block is
freed it rises to that block's size (up to 32 MiB), after which activations of that size
come from the heap and stay resident when freed. A training step frees hundreds of MB of
activations and gradients every backward pass, so the process's resident peak ends up
about twice the memory its tensors ever use at once (measured: 1505 MiB vs 735 MiB for a
58M Llama step at 4 x 512, benchmarks/train.py). Setting the threshold explicitly
(1 MiB) turns the dynamic rule off. Any program can do the same with the environment
variable MALLOC_MMAP_THRESHOLD_=1048576. No-op where glibc is not the allocator.
Tests: tests/train/test_malloc.py.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 20


def return_freed_memory(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap (and trim) threshold at `threshold` bytes; True if it was set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(mallopt(M_TRIM_THRESHOLD, threshold))
