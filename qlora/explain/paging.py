"""`qlora explain paging`: what paged AdamW moves, when, and what it costs.

    from qlora.explain.paging import explain_paging
    d = explain_paging()      # a live paged run on the CPU + the measured benchmark figures

What is paged: each parameter's whole AdamW state (m and v, or their 8-bit codes and
scales), never weights or activations. When: `Pager.place()` before every step compares
the state to the budget (free device memory minus a margin) and evicts or restores whole
states; `Pager.stream()` runs the updates of host-resident states through two staging
pages. The live run below uses both tiers on the CPU with a budget of half the state, as
tests/optim/test_paging.py does. The costs are the figures measured by
`benchmarks/optim.py --threads 1` (docs/benchmarks.md, "Optimizers"); a test checks
that BENCHMARK still matches that file. Tests: tests/test_explain.py.
"""
from __future__ import annotations

import torch

from ..optim import AdamW
from ..optim.adamw import _page_elements
from ..optim.paging import DEFAULT_CUDA_MARGIN, DEFAULT_PAGE_BYTES
from .text import table

BENCHMARK_SOURCE = "docs/benchmarks.md, Optimizers: `.venv/bin/python benchmarks/optim.py --threads 1` (8.40M parameters, this 2-core CPU)"
BENCHMARK = {  # optimizer: (step ms, state bytes/param, state paged out, moved per step)
    "qlora AdamW 32-bit": (43.6, 8.000, "", ""),
    "qlora AdamW 32-bit paged (default budget)": (43.5, 8.000, "0%", "0"),
    "qlora AdamW 32-bit paged (budget 1/2 of state)": (63.2, 8.000, "75%", "96.1 MiB"),
    "qlora AdamW 8-bit": (204.6, 2.037, "", ""),
    "qlora AdamW 8-bit paged (default budget)": (200.7, 2.037, "0%", "0"),
    "qlora AdamW 8-bit paged (budget 1/2 of state)": (207.9, 2.037, "75%", "24.4 MiB"),
}


def _live_run(state_bits: int, shapes: list[tuple[int, int]], steps: int, page_size: int) -> dict:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    total = sum(p.numel() for p in params) * (8 if state_bits == 32 else 2)  # about the state
    opt = AdamW(params, lr=1e-3, state_bits=state_bits, paged=True, budget=total // 2, page_size=page_size)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    pager = opt.pagers[torch.device("cpu")]
    return {"state_bits": state_bits, "params": sum(p.numel() for p in params), "budget": total // 2,
            "state_bytes": opt.state_bytes(), "device_bytes": opt.state_bytes("device"),
            "host_bytes": opt.state_bytes("host"), "moved_per_step": pager.moved_bytes / steps,
            "peak_device_bytes": pager.peak_device_bytes, "evictions": pager.evictions}


def explain_paging(shapes: tuple[tuple[int, int], ...] = ((512, 512),) * 8, steps: int = 3,
                   page_size: int = 1 << 20) -> dict:
    """Page geometry of the defaults, a live paged run on the CPU, and the benchmark figures."""
    return {
        "page_bytes": DEFAULT_PAGE_BYTES, "pages": 2, "cuda_margin": DEFAULT_CUDA_MARGIN,
        "page_elements": {32: _page_elements(False, DEFAULT_PAGE_BYTES), 8: _page_elements(True, DEFAULT_PAGE_BYTES)},
        "live": {bits: _live_run(bits, list(shapes), steps, page_size) for bits in (32, 8)},
        "live_page_bytes": page_size,
        "benchmark": BENCHMARK, "benchmark_source": BENCHMARK_SOURCE,
    }


def render_live(d: dict, markdown: bool = False) -> str:
    rows = [(f"{bits}-bit", f"{r['params']:,}", f"{r['state_bytes']:,}", f"{r['budget']:,}", f"{r['device_bytes']:,}",
             f"{r['host_bytes']:,}", f"{r['peak_device_bytes']:,}", f"{r['moved_per_step']:,.0f}")
            for bits, r in d["live"].items()]
    return table(["AdamW", "parameters", "state B", "budget B", "resident B", "on host B", "peak on device B",
                  "moved per step B"], rows, markdown)


def render_benchmark(d: dict, markdown: bool = False) -> str:
    base = d["benchmark"]["qlora AdamW 32-bit"][0]
    rows = [(name, f"{ms:.1f}", f"{ms / base:.2f}x", f"{bpp:.3f}", out or "-", moved or "-")
            for name, (ms, bpp, out, moved) in d["benchmark"].items()]
    return table(["optimizer", "step ms", "vs 32-bit", "state B/param", "paged out", "moved per step"], rows,
                 markdown)
