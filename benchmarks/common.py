"""Timing helpers shared by the benchmark scripts: interleaved runs, medians, a table."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_medians(cases: dict[str, Callable[[], object]], repeats: int = 25, warmup: int = 3) -> dict[str, float]:
    """Median seconds of each case, the cases run round-robin so machine noise hits all alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def print_table(title: str, medians: dict[str, float], baseline: str) -> None:
    """Medians in ms and the ratio to `baseline`."""
    print(f"\n{title}   (ratio = median / median of '{baseline}')")
    print(f"{'case':<50}{'median ms':>12}{'ratio':>10}")
    for name, t in medians.items():
        print(f"{name:<50}{t * 1e3:>12.2f}{t / medians[baseline]:>9.2f}x")
