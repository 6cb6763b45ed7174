"""Forward + backward of one QLoRA layer against a frozen bf16 layer with the same LoRA.

    .venv/bin/python benchmarks/layer.py [--rows 2048] [--dim 4096] [--r 16] [--repeats 5] [--warmup 1]
                                         [--threads N] [--cases dense,qlora,bnb,peft-dense,dense-nt]

Cases, all on x = [rows, dim] bf16 (requires grad) and a dim x dim weight; each runs
y = layer(x); y.backward(g), which computes grad_x and the LoRA gradients:
  dense       bf16 nn.Linear (frozen) + qlora LoRA: the baseline (16-bit LoRA)
  qlora       qlora Linear4bit (NF4 + DQ) + qlora LoRA: the goal, at most 1.10x the baseline
  bnb         bitsandbytes Linear4bit (NF4 + DQ, bf16 compute) + peft LoRA: the peer
  peft-dense  bf16 nn.Linear (frozen) + peft LoRA: the peer's own 16-bit baseline
  dense-nt    bf16 dense weight + qlora LoRA, backward through a stored W.T (2x the
              weight memory): an ideal dense layer for CPUs whose bf16 GEMM is slow for
              grad_y @ W (see qlora/nn/linear4bit.py); it isolates the cost of decoding
The first case listed is the baseline. LoRA: r = 16, alpha = 32, fp32 adapters, B random
(a trained-looking adapter). The cases run round-robin (the order rotates each round)
after `--warmup` rounds; the table gives each median and two ratios to the baseline: of
the medians, and the median of the per-round ratios (paired, so drift in machine load
cancels). Also printed: one decode into the workspace and one bf16 matmul, for scale.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import qlora
from qlora.nn import linear4bit

NAMES = {
    "dense": "bf16 nn.Linear (frozen) + qlora LoRA",
    "qlora": "qlora Linear4bit (NF4 + DQ) + qlora LoRA",
    "bnb": "bitsandbytes Linear4bit + peft LoRA",
    "peft-dense": "bf16 nn.Linear (frozen) + peft LoRA",
    "dense-nt": "bf16 dense, stored W.T for backward + qlora LoRA",
}


class _DenseNT(torch.autograd.Function):
    """y = x @ W.T; grad_x = grad_y @ W computed as grad_y @ (W.T).T from a stored W.T."""

    @staticmethod
    def forward(ctx, x, w, w_t):
        ctx.w_t = w_t
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y.matmul(ctx.w_t.t()), None, None


class DenseNT(nn.Linear):
    """A frozen bf16 nn.Linear that also stores W.T for its backward."""

    def __init__(self, dense: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = dense.in_features, dense.out_features
        self.weight, self.bias = dense.weight, None
        self.register_buffer("weight_t", dense.weight.detach().t().contiguous())

    def forward(self, x):
        return _DenseNT.apply(x, self.weight, self.weight_t)


class One(nn.Module):
    """A one-layer model for peft.get_peft_model."""

    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def build(case: str, dense: nn.Linear, r: int) -> nn.Module:
    if case == "dense":
        return qlora.LoraLinear(dense, r=r, alpha=2 * r)
    if case == "qlora":
        return qlora.LoraLinear(qlora.Linear4bit.from_linear(dense), r=r, alpha=2 * r)
    if case == "dense-nt":
        return qlora.LoraLinear(DenseNT(dense), r=r, alpha=2 * r)
    import bitsandbytes as bnb
    import peft

    config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["proj"])
    if case == "bnb":
        peer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False, compute_dtype=torch.bfloat16,
                                 quant_type="nf4", compress_statistics=True)
        peer.load_state_dict(dense.state_dict())
        return peft.get_peft_model(One(peer.to("cpu")), config)  # bitsandbytes quantizes on the move
    if case == "peft-dense":
        copy = nn.Linear(dense.in_features, dense.out_features, bias=False, dtype=torch.bfloat16)
        copy.load_state_dict(dense.state_dict())
        return peft.get_peft_model(One(copy.requires_grad_(False)), config)
    raise ValueError(f"unknown case {case!r}; choose from {', '.join(NAMES)}")


def randomize_b(module: nn.Module) -> None:
    for name, p in module.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.normal_(0, 0.01)


def time_decode_and_matmul(rows: int, dim: int) -> tuple[float, float]:
    qt = qlora.quantize(torch.randn(dim, dim, dtype=torch.bfloat16) * 0.02)
    ws = linear4bit.workspace(qt.shape, torch.bfloat16, qt.device)
    x = torch.randn(rows, dim, dtype=torch.bfloat16)
    decode, mm = [], []
    for _ in range(7):
        t = time.perf_counter()
        qt.dequantize(out=ws)
        decode.append(time.perf_counter() - t)
    for _ in range(2):
        t = time.perf_counter()
        F.linear(x, ws)
        mm.append(time.perf_counter() - t)
    return statistics.median(decode), min(mm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cases", default="dense,qlora,bnb,peft-dense,dense-nt",
                    help=f"comma-separated, the first is the baseline; from {', '.join(NAMES)}")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keys = [k.strip() for k in args.cases.split(",") if k.strip()]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 GEMM: "
          f"{not linear4bit.transposed_backward(torch.device('cpu'), torch.bfloat16)}; "
          f"x [{args.rows}, {args.dim}] bf16, weight {args.dim} x {args.dim}, LoRA r = {args.r}")
    decode, mm = time_decode_and_matmul(args.rows, args.dim)
    print(f"one NF4 + DQ decode into the workspace: {decode * 1e3:.2f} ms; one bf16 matmul x @ W.T "
          f"[{args.rows}, {args.dim}] x [{args.dim}, {args.dim}]: {mm * 1e3:.1f} ms", flush=True)

    torch.manual_seed(0)
    dense = nn.Linear(args.dim, args.dim, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    cases = {NAMES[k]: build(k, dense, args.r) for k in keys}
    for m in cases.values():
        randomize_b(m)
    x = torch.randn(args.rows, args.dim, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(args.rows, args.dim, dtype=torch.bfloat16)

    def step(module: nn.Module) -> float:
        x.grad = None
        module.zero_grad(set_to_none=True)
        t = time.perf_counter()
        module(x).backward(g)
        return time.perf_counter() - t

    for _ in range(args.warmup):  # workspaces, kernels, allocator
        for m in cases.values():
            step(m)
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for i in range(args.repeats):
        for name in names[i % len(names):] + names[: i % len(names)]:  # rotate the order each round
            times[name].append(step(cases[name]))
        print(f"  round {i + 1}: " + ", ".join(f"{times[n][-1] * 1e3:.0f} ms" for n in names), flush=True)
    base = names[0]
    print(f"\nforward + backward, {args.repeats} interleaved round(s) after {args.warmup} warm-up round(s)")
    print("| case | median ms | vs baseline (medians) | vs baseline (paired) |")
    print("|---|---|---|---|")
    for name in names:
        med = statistics.median(times[name])
        paired = statistics.median(t / b for t, b in zip(times[name], times[base]))
        print(f"| {name} | {med * 1e3:.1f} | {med / statistics.median(times[base]):.3f}x | {paired:.3f}x |")


if __name__ == "__main__":
    main()
