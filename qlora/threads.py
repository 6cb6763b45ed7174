"""OpenMP workers that sleep when idle, so qlora slows in proportion to a busy machine.

    import qlora      # first thing: sets OMP_WAIT_POLICY=PASSIVE unless torch is already imported

torch's CPU ops (and qlora's C kernels, which share torch's libgomp: quant/kernels/cpu.py) run on
OpenMP. libgomp's default has each worker spin for a while after every parallel region, waiting
for the next one. On a machine where another job wants the same cores, the spinning workers take
its time slices and it takes theirs; a worker descheduled mid-region holds up the whole region.
The tiny demo (30 steps) took 13.8 s with passive workers and 110 s with spinning ones beside
other engineers' jobs, and 31.6 s against 375 s beside a 2-thread matmul loop
(benchmarks/busy.py, docs/benchmarks.md). libgomp reads its settings once, when torch loads it,
so this runs before qlora imports torch; an explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT is
left alone, and QLORA_OMP_PASSIVE=0 turns it off.
"""
from __future__ import annotations

import os
import sys


def prefer_passive_openmp() -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE for the libgomp torch is about to load; False where it cannot
    take effect (torch already imported), is turned off, or the user chose a policy."""
    if os.environ.get("QLORA_OMP_PASSIVE", "1") == "0" or "torch" in sys.modules:
        return False
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
