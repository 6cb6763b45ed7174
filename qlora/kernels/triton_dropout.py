"""Seeded dropout on the GPU: the mask of qlora/nn/dropout.py (a hash of seed and index), in Triton.

    triton_dropout.seeded_dropout(x, out, threshold, scale, seed)   # contiguous float32/float16/bfloat16

The same definition, bit for bit, as the C kernel and the PyTorch reference: element i is kept
when the 16-bit half (i & 1) of fmix32((i >> 1) mod 2^32 XOR key) is >= threshold, with key =
fmix32(seed_hi XOR (i >> 33)) XOR seed_lo; kept values are x * scale in float32, rounded once.
One pass over x: the reference needs some 30 int64 tensor ops for the same mask.
Tests: tests/nn/test_dropout.py (`-k triton`, under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_decode
from .triton_decode import to_bf16

BLOCK = 4096


@triton.jit
def _fmix32(h):
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _store(ptr, offs, y, inside, BF16: tl.constexpr):
    if BF16:
        tl.store(ptr + offs, to_bf16(y), mask=inside)
    else:
        tl.store(ptr + offs, y.to(ptr.dtype.element_ty), mask=inside)


@triton.jit
def _dropout_kernel(x_ptr, out_ptr, x2_ptr, out2_ptr, n, seed_ptr, threshold, scale, scale2, PAIR: tl.constexpr,
                    BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    seed = tl.load(seed_ptr)  # int64, read on the device: the same kernel for every seed, and graph-capturable
    seed_lo, seed_hi = (seed & 0xFFFFFFFF).to(tl.uint32), ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    key = _fmix32(seed_hi ^ (offs >> 33).to(tl.uint32)) ^ seed_lo
    r = _fmix32((offs >> 1).to(tl.uint32) ^ key)
    keep = ((r >> ((offs & 1).to(tl.uint32) * 16)) & 0xFFFF) >= threshold.to(tl.uint32)
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    _store(out_ptr, offs, tl.where(keep, x * scale, 0.0), inside, BF16)
    if PAIR:  # a second tensor, the same mask
        x2 = tl.load(x2_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        _store(out2_ptr, offs, tl.where(keep, x2 * scale2, 0.0), inside, BF16)


def seeded_dropout(x: torch.Tensor, out: torch.Tensor, threshold: int, scale: float, seed: "int | torch.Tensor",
                   x2: torch.Tensor | None = None, out2: torch.Tensor | None = None, scale2: float = 0.0) -> None:
    """Dropout of contiguous `x` into `out` with the (threshold, scale) of dropout.threshold_and_scale(p),
    and of `x2` into `out2` (times scale2) with the same mask when given; `seed` a 0-dim int64
    tensor on x's device (an int is copied there first)."""
    n = x.numel()
    if n:
        if not isinstance(seed, torch.Tensor):
            v = seed & 0xFFFFFFFFFFFFFFFF
            seed = torch.tensor(v - (1 << 64) if v >= 1 << 63 else v, dtype=torch.int64, device=x.device)
        pair = x2 is not None
        with triton_decode.on_device(x):
            _dropout_kernel[(triton.cdiv(n, BLOCK),)](x, out, x2 if pair else x, out2 if pair else out, n, seed,
                                                       threshold, scale, scale2, PAIR=pair,
                                                       BF16=x.dtype == torch.bfloat16, BLOCK=BLOCK)
