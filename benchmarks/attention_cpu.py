"""SDPA's CPU flash kernels: ms per call for the same 2,048 tokens in rows of 128, 256 and 512.

    flock /tmp/qlora-bench.lock .venv/bin/python benchmarks/attention_cpu.py [--threads 2] [--dtype bfloat16|float32]

bf16 (or --dtype), 8 heads of 64, with and without is_causal; 10 calls each after one warm-up call. Shows
whether attention's cost here grows with the query-key pairs (a row's length) or only with
the tokens, which decides whether confining attention to packed documents can pay
(docs/benchmarks.md, issue 19).
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    print(f"{'rows':>9} {'is_causal':>9} {'backward ms':>12} {'forward ms':>11}")
    for t in (128, 256, 512):
        b = 2048 // t
        q, k, v = (torch.randn(b, t, 8, 64, dtype=getattr(torch, args.dtype)).transpose(1, 2) for _ in range(3))
        for causal in (False, True):
            out, lse = forward(q, k, v, 0.0, causal)
            grad = torch.randn_like(out)
            backward(grad, q, k, v, out, lse, 0.0, causal)
            t0 = time.perf_counter()
            for _ in range(10):
                backward(grad, q, k, v, out, lse, 0.0, causal)
            t1 = time.perf_counter()
            for _ in range(10):
                forward(q, k, v, 0.0, causal)
            t2 = time.perf_counter()
            print(f"{f'{b} x {t}':>9} {str(causal):>9} {(t1 - t0) * 100:12.1f} {(t2 - t1) * 100:11.1f}")


if __name__ == "__main__":
    main()
