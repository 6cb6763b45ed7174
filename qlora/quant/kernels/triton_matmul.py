"""Triton GEMMs over a packed 4-bit weight, decoded tile by tile in the K loop, LoRA in the epilogue.

    y  = triton_matmul.linear_4bit(x, qt, scales, lora_in=xa, lora_w=B, scaling=s, bias=b)  # x W^T + s xa B^T + b
    dx = triton_matmul.linear_4bit_t(dy, qt, scales, lora_in=dyB, lora_w=A, scaling=s)      # dy W  + s dyB A

x [M, K] and dy [M, N] in the compute dtype (bf16 / fp16 / fp32), W = dequant(qt) [N, K]
never materialized: each program decodes the [BLOCK_N, BLOCK_K] tiles of W it multiplies
(bytes -> two nibbles -> code * block scale in float32 -> the compute dtype, the same
rounding as triton_decode, so the product uses exactly dequant(W)), accumulates in float32
and adds the rank-r LoRA product (r padded to at least 16 for tl.dot) and the bias before
the single rounding to the output dtype. `scales` is the float32 scale per block
(triton_decode.block_scales: the double quantization decoded once per call, 4 bytes per
64 weights), gathered per byte, or once per tile row when blocks start every row
(K % blocksize == 0) and a tile is at most one block wide. Requires an even K (a row starts
on a byte); callers fall back otherwise.
On a GPU the tile shapes are autotuned per (M, N, K, dtypes); under the interpreter one
small config runs (and dot operands are upcast to float32, see triton_decode "bf16 rounding").
Tests: tests/nn/test_triton_lora.py (`pytest -k triton`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from . import triton_decode
from .triton_decode import INTERPRET, to_bf16

if TYPE_CHECKING:
    from ..tensor import QuantizedTensor


def _configs() -> list[triton.Config]:
    if INTERPRET:  # one small tile that still exercises every mask on test-sized shapes
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4)]
    shapes = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 32, 4, 4),
              (64, 128, 64, 4, 4), (64, 64, 64, 4, 3), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


@triton.jit
def _w_tile(data_ptr, scale_ptr, code_ptr, offs_n, k0, N, K, HALF_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
            ROWS_ALIGNED: tl.constexpr, dtype: tl.constexpr, INTERP: tl.constexpr):
    """W[offs_n, k0:k0+BLOCK_K] decoded to `dtype` ([BLOCK_N, BLOCK_K]; 0 outside W)."""
    half = K // 2
    kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    row = offs_n[:, None].to(tl.int64) * half
    mask = (offs_n[:, None] < N) & (kb[None, :] < half)
    packed = tl.load(data_ptr + row + kb[None, :], mask=mask, other=0).to(tl.int32)
    if ROWS_ALIGNED and BLOCK_K <= 2 * HALF_BLOCK:
        # blocks start every row and the tile lies in one block per row: one scale per row
        scale = tl.load(scale_ptr + (row + k0 // 2) // HALF_BLOCK, mask=offs_n[:, None] < N, other=0.0)
    else:
        scale = tl.load(scale_ptr + (row + kb[None, :]) // HALF_BLOCK, mask=mask, other=0.0)
    w = tl.interleave(tl.load(code_ptr + (packed >> 4)) * scale, tl.load(code_ptr + (packed & 15)) * scale)
    if INTERP:
        if dtype == tl.bfloat16:
            w = to_bf16(w)
        w = w.to(dtype).to(tl.float32)  # the interpreter's tl.dot cannot read bf16: exact upcast
    else:
        w = w.to(dtype)
    return w


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n), grouped so consecutive programs share W tiles in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@triton.jit
def _operand(t, INTERP: tl.constexpr):
    if INTERP:
        t = t.to(tl.float32)
    return t


@triton.jit
def _store(ptr, acc, mask, INTERP: tl.constexpr):
    if INTERP and ptr.dtype.element_ty == tl.bfloat16:
        out = to_bf16(acc)
    else:
        out = acc.to(ptr.dtype.element_ty)
    tl.store(ptr, out, mask=mask)


@triton.autotune(configs=_configs(), key=["M", "N", "K", "R"])
@triton.jit
def _fwd_kernel(x_ptr, data_ptr, scale_ptr, code_ptr, xa_ptr, b_ptr, bias_ptr, y_ptr, M, N, K, R, scaling,
                HALF_BLOCK: tl.constexpr, ROWS_ALIGNED: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLOCK_R: tl.constexpr,
                INTERP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m[:, None].to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + rows * K + (k0 + offs_k)[None, :],
                    mask=(offs_m[:, None] < M) & ((k0 + offs_k)[None, :] < K), other=0.0)
        w = _w_tile(data_ptr, scale_ptr, code_ptr, offs_n, k0, N, K, HALF_BLOCK, BLOCK_K, ROWS_ALIGNED,
                    x_ptr.dtype.element_ty, INTERP)
        acc = tl.dot(_operand(x, INTERP), tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_LORA:  # + scaling * (x A^T) B^T, xa = x A^T precomputed [M, R]
        offs_r = tl.arange(0, BLOCK_R)
        xa = tl.load(xa_ptr + rows * R + offs_r[None, :], mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)
        b = tl.load(b_ptr + offs_n[:, None].to(tl.int64) * R + offs_r[None, :],
                    mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0)
        lora = tl.dot(_operand(xa, INTERP), tl.trans(_operand(b, INTERP)), input_precision=DOT_PRECISION)
        acc += scaling * lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    _store(y_ptr + rows * N + offs_n[None, :], acc, (offs_m[:, None] < M) & (offs_n[None, :] < N), INTERP)


@triton.autotune(configs=_configs(), key=["M", "N", "K", "R"])
@triton.jit
def _bwd_kernel(dy_ptr, data_ptr, scale_ptr, code_ptr, g_ptr, a_ptr, dx_ptr, M, N, K, R, scaling,
                HALF_BLOCK: tl.constexpr, ROWS_ALIGNED: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr,
                INTERP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # output tile dx[BLOCK_M, BLOCK_K]; the reduction runs over W's rows (N) in steps of BLOCK_N
    pid_m, pid_k = _tile_ids(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    rows = offs_m[:, None].to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        dy = tl.load(dy_ptr + rows * N + (n0 + offs_n)[None, :],
                     mask=(offs_m[:, None] < M) & ((n0 + offs_n)[None, :] < N), other=0.0)
        w = _w_tile(data_ptr, scale_ptr, code_ptr, n0 + offs_n, k0, N, K, HALF_BLOCK, BLOCK_K, ROWS_ALIGNED,
                    dy_ptr.dtype.element_ty, INTERP)
        acc = tl.dot(_operand(dy, INTERP), w, acc, input_precision=DOT_PRECISION)
    if HAS_LORA:  # + scaling * (dy B) A, g = dy B precomputed [M, R]
        offs_r = tl.arange(0, BLOCK_R)
        g = tl.load(g_ptr + rows * R + offs_r[None, :], mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)
        a = tl.load(a_ptr + offs_r[:, None].to(tl.int64) * K + offs_k[None, :],
                    mask=(offs_r[:, None] < R) & (offs_k[None, :] < K), other=0.0)
        acc += scaling * tl.dot(_operand(g, INTERP), _operand(a, INTERP), input_precision=DOT_PRECISION)
    _store(dx_ptr + rows * K + offs_k[None, :], acc, (offs_m[:, None] < M) & (offs_k[None, :] < K), INTERP)


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if tuple(t.shape) != shape or t.dtype != dtype or t.device != device or not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous {dtype} tensor of shape {shape} on {device}, got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device} (contiguous={t.is_contiguous()})")


def _common(a: torch.Tensor, qt: "QuantizedTensor", scales: torch.Tensor, lora_in, lora_w, what: str):
    triton_decode.check(qt, what)
    if len(qt.shape) != 2 or qt.shape[1] % 2:
        raise ValueError(f"{what}: needs a 2-D weight with an even number of columns, got {tuple(qt.shape)}")
    if a.dtype not in (torch.bfloat16, torch.float16, torch.float32) or a.dim() != 2:
        raise ValueError(f"{what}: the activation must be a 2-D float tensor, got {a.dtype} {tuple(a.shape)}")
    _check(f"{what} scales", scales, (qt.absmax.numel(),), torch.float32, a.device)
    r = 0
    if lora_in is not None:
        r = lora_in.shape[-1]
        _check(f"{what} lora_in", lora_in, (a.shape[0], r), a.dtype, a.device)
    precision = "ieee" if a.dtype == torch.float32 else "tf32"  # fp32 compute: no TF32, as torch.matmul
    return r, max(16, triton.next_power_of_2(max(r, 1))), precision


def linear_4bit(x: torch.Tensor, qt: "QuantizedTensor", scales: torch.Tensor, lora_in: torch.Tensor | None = None,
                lora_w: torch.Tensor | None = None, scaling: float = 1.0, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = x dequant(W)^T + scaling * lora_in lora_w^T + bias: x [M, K], lora_in [M, r], lora_w [N, r]."""
    r, block_r, precision = _common(x, qt, scales, lora_in, lora_w, "linear_4bit")
    (n, k), m = qt.shape, x.shape[0]
    _check("linear_4bit x", x, (m, k), x.dtype, qt.data.device)
    if lora_in is not None:
        _check("linear_4bit lora_w", lora_w, (n, r), x.dtype, x.device)
    if bias is not None:
        _check("linear_4bit bias", bias, (n,), x.dtype, x.device)
    y = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    with triton_decode.on_device(x):
        _fwd_kernel[grid](x, qt.data, scales, qt.code, lora_in if r else x, lora_w if r else x,
                          bias if bias is not None else x, y, m, n, k, r, float(scaling),
                          HALF_BLOCK=qt.blocksize // 2, ROWS_ALIGNED=k % qt.blocksize == 0,
                          HAS_LORA=bool(r), HAS_BIAS=bias is not None, BLOCK_R=block_r,
                          INTERP=INTERPRET, DOT_PRECISION=precision)
    return y


def linear_4bit_t(dy: torch.Tensor, qt: "QuantizedTensor", scales: torch.Tensor, lora_in: torch.Tensor | None = None,
                  lora_w: torch.Tensor | None = None, scaling: float = 1.0,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """dx = dy dequant(W) + scaling * lora_in lora_w: dy [M, N], lora_in [M, r], lora_w [r, K]."""
    r, block_r, precision = _common(dy, qt, scales, lora_in, lora_w, "linear_4bit_t")
    (n, k), m = qt.shape, dy.shape[0]
    _check("linear_4bit_t dy", dy, (m, n), dy.dtype, qt.data.device)
    if lora_in is not None:
        _check("linear_4bit_t lora_w", lora_w, (r, k), dy.dtype, dy.device)
    dx = torch.empty(m, k, dtype=out_dtype or dy.dtype, device=dy.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)  # noqa: E731
    with triton_decode.on_device(dy):
        _bwd_kernel[grid](dy, qt.data, scales, qt.code, lora_in if r else dy, lora_w if r else dy, dx, m, n, k, r,
                          float(scaling), HALF_BLOCK=qt.blocksize // 2, ROWS_ALIGNED=k % qt.blocksize == 0,
                          HAS_LORA=bool(r), BLOCK_R=block_r,
                          INTERP=INTERPRET, DOT_PRECISION=precision)
    return dx
