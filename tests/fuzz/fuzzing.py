"""What every fuzz case checks, shared by tests/fuzz (hypothesis) and benchmarks/fuzz.py (a plain loop).

    outcome, peak = bounded(lambda: reader(path), limit=len(data) + MIB)

`bounded` runs one read: its value, or the QloraError it raised (any other exception escapes
and is a finding); it asserts the read took under `SECONDS` and that tracemalloc's peak (Python
allocations, numpy's included) stayed under `limit` bytes.
"""
from __future__ import annotations

import random
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from qlora.errors import QloraError

MIB = 1 << 20
SECONDS = 5.0


def bounded(read: Callable[[], Any], limit: int) -> Any:
    """read() or the QloraError it raised, checked for time and traced memory."""
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base, start = tracemalloc.get_traced_memory()[0], time.perf_counter()
    try:
        result = read()
    except QloraError as e:
        result = e
    finally:
        peak, elapsed = tracemalloc.get_traced_memory()[1] - base, time.perf_counter() - start
        if not tracing:
            tracemalloc.stop()
    assert peak < limit, f"the read peaked at {peak} traced bytes, limit {limit}"
    assert elapsed < SECONDS, f"the read took {elapsed:.1f} s"
    return result


def flip_bits(data: bytes, rng: random.Random, within: int | None = None, most: int = 4) -> bytes:
    """`data` with 1..`most` random bits flipped (in its first `within` bytes when given)."""
    out = bytearray(data)
    for _ in range(rng.randint(1, most)):
        at = rng.randrange(within or len(data))
        out[at] ^= 1 << rng.randrange(8)
    return bytes(out)


NON_UTF8 = (b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80")
INTERESTING = (0, 1, 1 << 31, (1 << 32) - 1, 1 << 63, (1 << 64) - 1, -1)
