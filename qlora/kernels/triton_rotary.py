"""Rotary position embedding of q and k on the GPU, both in one launch, in Triton.

    triton_rotary.rotary(q, k, cos, sin, q_out, k_out, backward)   # see kernels.rotary

The formula of the C kernel (qlora_cpu.c) and of the reference (nn/rotary.py), bit for bit:
each product and each sum rounded to the dtype, as torch's op-by-op form rounds them. One
program per (batch, token) row: its cos and sin loaded once, then every head of q and of k.
Tests: tests/nn/test_rotary.py (`-k triton`, under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_decode
from .triton_decode import LAUNCH, to_bf16


@triton.jit
def _round(v, dtype: tl.constexpr):
    if dtype == tl.bfloat16:
        out = to_bf16(v).to(tl.float32)
    else:
        out = v.to(dtype).to(tl.float32)
    return out


@triton.jit
def _rotate(x_ptr, out_ptr, heads, sh, base, c1, c2, s1, s2, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
            BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    i = tl.arange(0, BLOCK_D)[None, :]
    inside = (h < heads) & (i < HALF)
    offs = base + h.to(tl.int64) * sh + i
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    x1 = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + offs + HALF, mask=inside, other=0.0).to(tl.float32)
    if BACKWARD:  # dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1
        y1 = _round(x1 * c1, dtype) + _round(x2 * s2, dtype)
        y2 = _round(x2 * c2, dtype) - _round(x1 * s1, dtype)
    else:  # y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2
        y1 = _round(x1 * c1, dtype) - _round(x2 * s1, dtype)
        y2 = _round(x2 * c2, dtype) + _round(x1 * s2, dtype)
    if dtype == tl.bfloat16:
        tl.store(out_ptr + offs, to_bf16(y1), mask=inside)
        tl.store(out_ptr + offs + HALF, to_bf16(y2), mask=inside)
    else:
        tl.store(out_ptr + offs, y1.to(dtype), mask=inside)
        tl.store(out_ptr + offs + HALF, y2.to(dtype), mask=inside)


@triton.jit
def _rotary_kernel(q_ptr, qo_ptr, k_ptr, ko_ptr, cos_ptr, sin_ptr, hq, qsb, qsh, qst, hk, ksb, ksh, kst, csb, cst,
                   tokens, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    b, t = r // tokens, r % tokens
    i = tl.arange(0, BLOCK_D)[None, :]
    c0 = b * csb + t * cst + i
    d = i < HALF
    c1 = tl.load(cos_ptr + c0, mask=d, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + c0 + HALF, mask=d, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + c0, mask=d, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + c0 + HALF, mask=d, other=0.0).to(tl.float32)
    _rotate(q_ptr, qo_ptr, hq, qsh, b * qsb + t * qst, c1, c2, s1, s2, HALF, BLOCK_H, BLOCK_D, BACKWARD)
    _rotate(k_ptr, ko_ptr, hk, ksh, b * ksb + t * kst, c1, c2, s1, s2, HALF, BLOCK_H, BLOCK_D, BACKWARD)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_out: torch.Tensor,
           k_out: torch.Tensor, backward: bool, cos_batch_stride: int) -> None:
    """q and k [batch, heads, tokens, dim] into q_out, k_out (the same strides); cos, sin
    [*, tokens, dim] (batch stride `cos_batch_stride`, 0 where broadcast). Checked by kernels.rotary."""
    batch, hq, tokens, dim = q.shape
    hk = k.shape[1]
    if batch * tokens == 0:
        return
    with triton_decode.on_device(q):
        _rotary_kernel[(batch * tokens,)](
            q, q_out, k, k_out, cos, sin, hq, q.stride(0), q.stride(1), q.stride(2), hk, k.stride(0), k.stride(1),
            k.stride(2), cos_batch_stride, cos.stride(-2), tokens, HALF=dim // 2,
            BLOCK_H=triton.next_power_of_2(max(hq, hk)), BLOCK_D=triton.next_power_of_2(dim // 2),
            BACKWARD=backward, **LAUNCH)
