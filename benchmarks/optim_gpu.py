"""GPU only: fill device memory until a plain AdamW step fails, then let the paged one finish.

    .venv/bin/python benchmarks/optim_gpu.py                    # ~2 minutes on one H200
    .venv/bin/python benchmarks/optim_gpu.py --params-gb 1 --steps 3   # quicker

Without CUDA it prints one line and exits 0. Sections, each printed as it finishes:
1. correctness on the device: paged (small explicit budget, so state really streams through
   pinned host pages on the side stream) vs unpaged, 32- and 8-bit: parameters must be
   bit-identical after a few steps; state_dict equal too.
2. baseline with free memory: step time of torch.optim.AdamW and of qlora AdamW (paged,
   budget "auto": everything resident), and the pinned host -> device copy bandwidth.
3. a full device: filler tensors leave less free memory than the 8 bytes/param that AdamW
   state needs. A fresh torch.optim.AdamW step raises OutOfMemoryError; fresh qlora AdamW
   (paged, 32-bit and 8-bit) completes the steps, paging what does not fit.
4. a spike in a running job: the resident optimizer from section 2 sees the filler appear
   (its "auto" budget drops), evicts state to host before the step, completes, and
   restores the state once the filler is freed (plus torch.cuda.empty_cache()).
Cost of paging per GiB = (paged step time - resident step time) / GiB moved per step
(both directions counted).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import torch

from qlora.optim import AdamW
from qlora.optim.paging import DEFAULT_CUDA_MARGIN

GiB = 2**30


def timed_steps(opt: torch.optim.Optimizer, steps: int) -> float:
    """Median seconds per step (device synchronized around each)."""
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_params(n_gb: float, dim: int = 4096, seed: int = 0) -> list[torch.nn.Parameter]:
    count = max(1, int(n_gb * GiB / (dim * dim * 4)))
    g = torch.Generator(device="cuda").manual_seed(seed)
    params = []
    for _ in range(count):
        p = torch.nn.Parameter(torch.randn(dim, dim, device="cuda", generator=g) * 0.02)
        p.grad = torch.randn(dim, dim, device="cuda", generator=g) * 1e-3
        params.append(p)
    return params


def free_bytes() -> int:
    return torch.cuda.mem_get_info()[0]


def fill_until(leave: int) -> list[torch.Tensor]:
    """Allocate filler until the driver reports about `leave` bytes free."""
    filler = []
    while free_bytes() > leave + GiB:
        filler.append(torch.empty(GiB, dtype=torch.uint8, device="cuda"))
    rest = free_bytes() - leave
    if rest > 2**20:
        filler.append(torch.empty(rest, dtype=torch.uint8, device="cuda"))
    return filler


def release() -> None:
    """Collect dropped tensors and hand cached blocks back to the driver (mem_get_info sees them)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def correctness() -> None:
    print("## 1. correctness on the device (paged vs unpaged, bit for bit)")
    for bits in (32, 8):
        a = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in [(512, 300), (70_000,), (33,), (1000, 64)]]
        b = [torch.nn.Parameter(p.detach().clone()) for p in a]
        paged = AdamW(a, lr=1e-2, state_bits=bits, paged=True, budget=200_000, page_size=16_384)
        plain = AdamW(b, lr=1e-2, state_bits=bits, paged=False)
        for step in range(5):
            for p, q in zip(a, b):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
            paged.step()
            plain.step()
        pager = paged.pagers[a[0].device]
        same = all(torch.equal(p, q) for p, q in zip(a, b))
        sd1, sd2 = paged.state_dict(), plain.state_dict()
        same_state = all(torch.equal(sd1["state"][i][k], t) for i, s in sd2["state"].items() for k, t in s.items())
        host = paged.state_bytes("host")
        paged_out = [t for p in a if not pager.is_resident(p) for k, t in paged.state[p].items() if k != "step"]
        pinned = all(t.is_pinned() for t in paged_out)
        print(
            f"{bits}-bit: params identical {same}, state_dict identical {same_state}; "
            f"{host} state bytes paged (pinned {pinned}), peak device {pager.peak_device_bytes} <= budget 200000, "
            f"moved {pager.moved_bytes / 2**20:.1f} MiB"
        )
        if not (same and same_state and host > 0 and pinned and pager.peak_device_bytes <= 200_000):
            print("FAILED")
            sys.exit(1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params-gb", type=float, default=2.0, help="fp32 trainable parameters, GiB")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/optim_gpu.py: no CUDA device here; run it on a GPU machine (nothing measured)")
        return 0
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.total_memory / GiB:.1f} GiB, torch {torch.__version__}\n")
    correctness()

    print(f"\n## 2. baseline, free memory ({args.params_gb:g} GiB of fp32 parameters)")
    params = make_params(args.params_gb)
    n = sum(p.numel() for p in params)
    state_gb = 8 * n / GiB
    host = torch.empty(GiB, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    h2d = 5 / (time.perf_counter() - t0)
    del host, dev
    release()
    print(f"pinned host -> device copy: {h2d:.1f} GiB/s")
    torch_opt = torch.optim.AdamW(params, lr=1e-4)
    t_torch = timed_steps(torch_opt, args.steps)
    del torch_opt
    release()
    opt = AdamW(params, lr=1e-4, paged=True)
    t_res = timed_steps(opt, args.steps)
    pager = opt.pagers[params[0].device]
    print(f"{n / 1e6:.0f}M params, AdamW state {state_gb:.2f} GiB")
    print(f"torch.optim.AdamW: {t_torch * 1e3:.1f} ms/step")
    print(f"qlora AdamW paged, all resident: {t_res * 1e3:.1f} ms/step (host state {opt.state_bytes('host')} bytes)")

    print("\n## 3. a full device: fresh optimizers with only ~1/4 of the state's room free")
    opt_sd = opt.state_dict()  # keep the running job's state on the host while we test fresh ones
    del opt, pager
    release()
    leave = int(state_gb * GiB / 4) + DEFAULT_CUDA_MARGIN
    filler = fill_until(leave)
    print(f"filled {sum(f.numel() for f in filler) / GiB:.1f} GiB; {free_bytes() / GiB:.2f} GiB free")
    try:
        torch_opt = torch.optim.AdamW(params, lr=1e-4)
        torch_opt.step()
        torch.cuda.synchronize()
        print("torch.optim.AdamW: step completed (the device was not full enough)")
    except torch.OutOfMemoryError as e:
        print(f"torch.optim.AdamW: OutOfMemoryError ({str(e).splitlines()[0][:100]})")
    torch_opt = None
    release()
    rows = []
    for bits in (32, 8):
        fresh = AdamW(params, lr=1e-4, state_bits=bits, paged=True)
        fresh.step()  # first step places state (most on the host)
        p = fresh.pagers[params[0].device]
        p.moved_bytes = 0
        t = timed_steps(fresh, args.steps)
        moved = p.moved_bytes / args.steps / GiB
        rows.append((bits, t, moved, fresh.state_bytes("device") / GiB, fresh.state_bytes("host") / GiB))
        del fresh, p
        release()
    for bits, t, moved, on_dev, on_host in rows:
        print(
            f"qlora AdamW {bits}-bit paged: completed, {t * 1e3:.1f} ms/step; state {on_dev:.2f} GiB on device, "
            f"{on_host:.2f} GiB on host; {moved:.2f} GiB moved/step"
        )
    t32, moved32 = rows[0][1], rows[0][2]
    if moved32 > 0:
        print(
            f"cost of paging (32-bit): {(t32 - t_res) / moved32 * 1e3:.1f} ms per GiB moved "
            f"(the copy alone, at {h2d:.0f} GiB/s: {1e3 / h2d:.1f} ms per GiB)"
        )
    del filler
    release()

    print("\n## 4. a spike in a running job")
    opt = AdamW(params, lr=1e-4, paged=True)
    opt.load_state_dict(opt_sd)
    opt.step()  # state back on the device
    pager = opt.pagers[params[0].device]
    print(f"before: {opt.state_bytes('device') / GiB:.2f} GiB resident, {opt.state_bytes('host') / GiB:.2f} GiB host")
    filler = fill_until(DEFAULT_CUDA_MARGIN // 4)  # the spike eats the margin and more
    evictions = pager.evictions
    pager.moved_bytes = 0
    t_spike = timed_steps(opt, args.steps)
    print(
        f"spike ({sum(f.numel() for f in filler) / GiB:.1f} GiB filler): {pager.evictions - evictions} states evicted, "
        f"{opt.state_bytes('device') / GiB:.2f} GiB resident, {opt.state_bytes('host') / GiB:.2f} GiB host; "
        f"steps completed, {t_spike * 1e3:.1f} ms/step, {pager.moved_bytes / args.steps / GiB:.2f} GiB moved/step"
    )
    del filler
    release()
    restores = pager.restores
    t_after = timed_steps(opt, args.steps)
    print(
        f"after the spike: {pager.restores - restores} states restored, {opt.state_bytes('host') / GiB:.2f} GiB host, "
        f"{t_after * 1e3:.1f} ms/step"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
