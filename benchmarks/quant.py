"""Decode and quantize speed of a 4096 x 4096 NF4 + DQ weight: qlora vs bitsandbytes vs the copy floor.

    .venv/bin/python benchmarks/quant.py [--size 4096] [--repeats 25] [--threads N]

Decode writes bf16 into a preallocated buffer (what Linear4bit does); the floor is a bf16
`copy_` of the same output size into a preallocated buffer. bitsandbytes'
`dequantize_4bit` has no out= and allocates its output each call. torchao's NF4Tensor is
timed when torchao is installed.
"""
from __future__ import annotations

import argparse
import os

import torch

from common import interleaved_medians, print_table

import qlora
from qlora import kernels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import bitsandbytes.functional as bnbF

    torch.manual_seed(0)
    w = torch.randn(args.size, args.size, dtype=torch.bfloat16)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"qlora decode path: {'AVX2' if kernels.has_simd() else 'scalar/reference'}")
    qt = qlora.quantize(w)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    out, src, dst = (torch.empty_like(w) for _ in range(3))
    src.normal_()
    decode = {
        "bf16 copy_ into a preallocated buffer (floor)": lambda: dst.copy_(src),
        "qlora dequantize(out=buffer)": lambda: qt.dequantize(out=out),
        "qlora dequantize() (fresh output)": lambda: qt.dequantize(),
        "bitsandbytes dequantize_4bit": lambda: bnbF.dequantize_4bit(packed, state),
    }
    try:
        from torchao.dtypes.nf4tensor import to_nf4

        nf4 = to_nf4(w)
        decode["torchao NF4Tensor.get_original_weight"] = nf4.get_original_weight
    except ImportError:
        print("torchao not installed: skipped")
    med = interleaved_medians(decode, args.repeats)
    print_table(f"decode {args.size}x{args.size} NF4 + DQ -> bf16", med, "bf16 copy_ into a preallocated buffer (floor)")
    speedup = med["bitsandbytes dequantize_4bit"] / med["qlora dequantize(out=buffer)"]
    print(f"qlora decode vs floor: {med['qlora dequantize(out=buffer)'] / med['bf16 copy_ into a preallocated buffer (floor)']:.2f}x "
          f"(goal <= 1.00x); vs bitsandbytes: {speedup:.1f}x faster (goal >= 3x)")

    quant = {
        "qlora quantize (nf4 + DQ)": lambda: qlora.quantize(w),
        "bitsandbytes quantize_4bit (nf4 + DQ)": lambda: bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True),
    }
    med_q = interleaved_medians(quant, max(5, args.repeats // 5), warmup=1)
    print_table(f"quantize {args.size}x{args.size} bf16 -> NF4 + DQ", med_q, "bitsandbytes quantize_4bit (nf4 + DQ)")
    os.environ["QLORA_KERNELS"] = "reference"
    qlora.kernels.reread_mode()
    ref = interleaved_medians({"pure PyTorch reference decode": lambda: qt.dequantize(out=out)}, 3, warmup=1)
    print(f"\npure PyTorch reference decode (the oracle): {ref['pure PyTorch reference decode'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
