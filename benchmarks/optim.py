"""Optimizer step time and state bytes per parameter on this CPU, side by side.

    .venv/bin/python benchmarks/optim.py                 # ~1-2 minutes on 2 cores
    .venv/bin/python benchmarks/optim.py --matrices 4 --dim 512 --rounds 5   # quicker

Compares torch.optim.AdamW (single-tensor, foreach and fused), bitsandbytes AdamW / AdamW8bit
(CPU code paths), and qlora.optim.AdamW: 32-bit and 8-bit, unpaged, paged with the
default budget (a no-op without an accelerator), and paged with a budget of half the
state: both tiers are then the CPU, the two staging pages take a quarter of the state, a
quarter stays resident and the other three quarters stream through the pages each step
(the cost of the paging machinery itself, not of a PCIe link).

The parameters look like a model's trainable set: `--matrices` square weights of `--dim`
plus as many small vectors (biases / norms, under 4096 elements, which keep float32 state
in 8-bit mode). Every optimizer gets its own copy and the same gradients; steps are
interleaved (one step of each per round) and the median over rounds is reported, because
these machines are shared and noisy: compare ratios, not absolute times.
State bytes: every tensor in the optimizer's state except step counters (bitsandbytes'
two 256-entry maps per tensor included).
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from qlora.optim import AdamW


def make_params(matrices: int, dim: int, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for _ in range(matrices):
        params.append(torch.nn.Parameter(torch.randn(dim, dim, generator=g) * 0.02))
        params.append(torch.nn.Parameter(torch.ones(dim)))
    return params


def state_bytes(opt: torch.optim.Optimizer) -> int:
    if isinstance(opt, AdamW):
        return opt.state_bytes()
    return sum(
        t.numel() * t.element_size()
        for state in opt.state.values()
        for k, t in state.items()
        if torch.is_tensor(t) and k != "step"
    )


def optimizers(args) -> dict[str, Callable]:
    """name -> build(params); budgets are fractions of the state size measured first."""
    def qlora(bits: int, paged: bool, fraction: float | None = None):
        def build(params):
            if fraction is None:
                return AdamW(params, lr=1e-3, state_bits=bits, paged=paged)
            budget = int(fraction * sizes[bits])
            return AdamW(params, lr=1e-3, state_bits=bits, paged=True, budget=budget)

        return build

    sizes = {}
    for bits in (32, 8):
        params = make_params(args.matrices, args.dim)
        opt = AdamW(params, state_bits=bits, paged=False)
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        sizes[bits] = opt.state_bytes()
    table = {
        "torch AdamW (single-tensor)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False),
        "torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "torch AdamW (fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "qlora AdamW 32-bit": qlora(32, False),
        "qlora AdamW 32-bit paged (default budget)": qlora(32, True),
        "qlora AdamW 32-bit paged (budget 1/2 of state)": qlora(32, True, 0.5),
        "qlora AdamW 8-bit": qlora(8, False),
        "qlora AdamW 8-bit paged (default budget)": qlora(8, True),
        "qlora AdamW 8-bit paged (budget 1/2 of state)": qlora(8, True, 0.5),
    }
    try:
        import bitsandbytes as bnb

        table["bitsandbytes AdamW (32-bit)"] = lambda ps: bnb.optim.AdamW(ps, lr=1e-3)
        table["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3)
    except ImportError:
        print("bitsandbytes not installed: its rows are skipped")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--matrices", type=int, default=8)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    builders = optimizers(args)
    runs = {}
    for name, build in builders.items():
        params = make_params(args.matrices, args.dim)
        runs[name] = (params, build(params))
    n_params = sum(p.numel() for p in make_params(args.matrices, args.dim))
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) * 0.01 for p in make_params(args.matrices, args.dim)]
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.warmup + args.rounds):
        if r == args.warmup:  # count page traffic of the timed steps only
            for _, opt in runs.values():
                for pager in getattr(opt, "pagers", {}).values():
                    pager.moved_bytes = 0
        for name, (params, opt) in runs.items():
            for p, grad in zip(params, grads):
                p.grad = grad.clone()
            t0 = time.perf_counter()
            opt.step()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    base = statistics.median(times["torch AdamW (single-tensor)"])
    print(
        f"{n_params / 1e6:.2f}M parameters ({args.matrices} x [{args.dim}, {args.dim}] + {args.matrices} x "
        f"[{args.dim}]), torch {torch.__version__}, {args.threads} threads, median of {args.rounds} "
        f"interleaved steps after {args.warmup} warm-up\n"
    )
    print("| optimizer | step ms | vs torch AdamW | state bytes/param | state paged out | moved per step |")
    print("|---|---|---|---|---|---|")
    for name, (params, opt) in runs.items():
        t = statistics.median(times[name])
        moved = paged_out = ""
        if isinstance(opt, AdamW) and opt.pagers:
            pager = next(iter(opt.pagers.values()))
            moved = f"{pager.moved_bytes / args.rounds / 2**20:.1f} MiB" if pager.moved_bytes else "0"
            paged_out = f"{opt.state_bytes('host') / opt.state_bytes():.0%}"
        row = f"{t * 1e3:.1f} | {t / base:.2f} | {state_bytes(opt) / n_params:.3f} | {paged_out} | {moved}"
        print(f"| {name} | {row} |")


if __name__ == "__main__":
    main()
