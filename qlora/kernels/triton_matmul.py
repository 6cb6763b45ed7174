"""Triton GEMMs over a packed 4-bit weight, decoded tile by tile in the K loop, LoRA in the epilogue.

    y  = triton_matmul.linear_4bit(x, qt, scales, lora_in=xa, lora_w=B, scaling=s, bias=b)  # x W^T + s xa B^T + b
    dx = triton_matmul.linear_4bit_t(dy, qt, scales, lora_in=dyB, lora_w=A, scaling=s)      # dy W  + s dyB A

x [M, K] and dy [M, N] in the compute dtype (bf16 / fp16 / fp32), W = dequant(qt) [N, K]
never materialized: each program decodes the tiles of W it multiplies (byte -> the codes of
both nibbles in one look-up of a 256-entry table of float32 pairs, `code_pairs` -> times the
block scale in float32 -> the compute dtype, as triton_decode does, so the product uses
exactly dequant(W)), accumulates in float32 and adds the rank-r LoRA product
(r padded to at least 16 for tl.dot) and the bias before the single rounding to the output dtype.
Both kernels compute the transposed product (y^T = W x^T, dx^T = W^T dy^T): the decoded W
tile is the MMA's first operand, which Hopper's wgmma reads from registers: it skips shared
memory, triton 3.9 then keeps one wgmma group in flight while the next tile decodes (3.6
waits for each group, as it did for W as the second operand; benchmarks/sass.py), and the
token count M is the MMA's N dimension, which may be as small as 16.
`scales` is the float32 scale per block (triton_decode.block_scales: the double quantization
decoded once per call, 4 bytes per 64 weights), gathered per byte, or once per tile row when
blocks start every row (K % blocksize == 0) and a tile is at most one block wide. Requires
an even K (a row starts on a byte); callers fall back otherwise.
On a GPU the tile shapes are autotuned per (M, N, K, dtypes); under the interpreter one
small config runs (and dot operands are upcast to float32, see triton_decode "bf16 rounding").
Tests: tests/nn/test_triton_lora.py (`pytest -k triton`); the sm_90 build:
tests/kernels/test_triton_compile.py.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from . import triton_decode
from .triton_decode import INTERPRET, code_pairs, decode_bytes, to_bf16

if TYPE_CHECKING:
    from .packed import Packed4bit


def _configs() -> list[triton.Config]:
    if INTERPRET:  # one small tile that still exercises every mask on test-sized shapes
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4)]
    # BLOCK_M (tokens) is the MMA's N: 16 to 256; the W-side tile (BLOCK_N forward, BLOCK_K backward)
    # is its M: 64 per warp group. BLOCK_K 64 = one block: one scale per tile row (blocksize 64)
    shapes = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3), (64, 128, 64, 4, 4),
              (64, 64, 64, 4, 4), (32, 128, 64, 4, 4), (16, 128, 64, 4, 4), (16, 64, 64, 4, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


@triton.jit
def _round(w, dtype: tl.constexpr, INTERP: tl.constexpr):
    """float32 weights rounded once to `dtype` (held as float32 under the interpreter, whose tl.dot cannot read bf16)."""
    if INTERP:
        if dtype == tl.bfloat16:
            w = to_bf16(w)
        w = w.to(dtype).to(tl.float32)
    else:
        w = w.to(dtype)
    return w


@triton.jit
def _decode_tile(data_ptr, scale_ptr, pair_ptr, row, kb, k0, mask, row_mask, HALF_BLOCK: tl.constexpr,
                 BLOCK_K: tl.constexpr, ROWS_ALIGNED: tl.constexpr):
    """float32 weights (hi, lo nibbles) of the bytes at row + kb (W's row starts and byte columns,
    broadcast to the tile; 0 outside W)."""
    packed = tl.load(data_ptr + row + kb, mask=mask, other=0).to(tl.int32)
    if ROWS_ALIGNED and BLOCK_K <= 2 * HALF_BLOCK:
        # blocks start every row and the tile lies in one block per row: one scale per row
        scale = tl.load(scale_ptr + (row + k0 // 2) // HALF_BLOCK, mask=row_mask, other=0.0)
    else:
        scale = tl.load(scale_ptr + (row + kb) // HALF_BLOCK, mask=mask, other=0.0)
    return decode_bytes(packed, pair_ptr, scale)


@triton.jit
def _w_tile(data_ptr, scale_ptr, pair_ptr, offs_n, k0, N, K, HALF_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
            ROWS_ALIGNED: tl.constexpr, dtype: tl.constexpr, INTERP: tl.constexpr):
    """W[offs_n, k0:k0+BLOCK_K] decoded to `dtype` ([BLOCK_N, BLOCK_K]; 0 outside W)."""
    kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    hi, lo = _decode_tile(data_ptr, scale_ptr, pair_ptr, offs_n[:, None].to(tl.int64) * (K // 2), kb[None, :], k0,
                          (offs_n[:, None] < N) & (kb[None, :] < K // 2), offs_n[:, None] < N,
                          HALF_BLOCK, BLOCK_K, ROWS_ALIGNED)
    return _round(tl.interleave(hi, lo), dtype, INTERP)


@triton.jit
def _wt_tile(data_ptr, scale_ptr, pair_ptr, offs_n, k0, N, K, HALF_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
             ROWS_ALIGNED: tl.constexpr, dtype: tl.constexpr, INTERP: tl.constexpr):
    """W[offs_n, k0:k0+BLOCK_K] transposed, decoded to `dtype` ([BLOCK_K, BLOCK_N]; 0 outside W)."""
    kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    hi, lo = _decode_tile(data_ptr, scale_ptr, pair_ptr, offs_n[None, :].to(tl.int64) * (K // 2), kb[:, None], k0,
                          (kb[:, None] < K // 2) & (offs_n[None, :] < N), offs_n[None, :] < N,
                          HALF_BLOCK, BLOCK_K, ROWS_ALIGNED)
    # rows 2j and 2j + 1 of the tile are byte j's high and low nibbles
    w = tl.reshape(tl.permute(tl.join(hi, lo), (0, 2, 1)), (BLOCK_K, offs_n.shape[0]))
    return _round(w, dtype, INTERP)


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
def _fwd_kernel(x_ptr, data_ptr, scale_ptr, pair_ptr, xa_ptr, b_ptr, bias_ptr, y_ptr, M, N, K, R, scaling,
                HALF_BLOCK: tl.constexpr, ROWS_ALIGNED: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLOCK_R: tl.constexpr,
                INTERP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # output tile y^T[BLOCK_N, BLOCK_M] = W[BLOCK_N, :] x[BLOCK_M, :]^T, reduced over K in steps of BLOCK_K
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    tokens = offs_m[None, :].to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        xt = tl.load(x_ptr + tokens * K + (k0 + offs_k)[:, None],
                     mask=((k0 + offs_k)[:, None] < K) & (offs_m[None, :] < M), other=0.0)
        w = _w_tile(data_ptr, scale_ptr, pair_ptr, offs_n, k0, N, K, HALF_BLOCK, BLOCK_K, ROWS_ALIGNED,
                    x_ptr.dtype.element_ty, INTERP)
        acc = tl.dot(w, _operand(xt, INTERP), acc, input_precision=DOT_PRECISION)
    if HAS_LORA:  # + scaling * B xa^T, xa = x A^T precomputed [M, R]
        offs_r = tl.arange(0, BLOCK_R)
        b = tl.load(b_ptr + offs_n[:, None].to(tl.int64) * R + offs_r[None, :],
                    mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0)
        xat = tl.load(xa_ptr + tokens * R + offs_r[:, None], mask=(offs_r[:, None] < R) & (offs_m[None, :] < M),
                      other=0.0)
        acc += scaling * tl.dot(_operand(b, INTERP), _operand(xat, INTERP), input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    _store(y_ptr + tokens * N + offs_n[:, None], acc, (offs_n[:, None] < N) & (offs_m[None, :] < M), INTERP)


@triton.autotune(configs=_configs(), key=["M", "N", "K", "R"])
@triton.jit
def _bwd_kernel(dy_ptr, data_ptr, scale_ptr, pair_ptr, g_ptr, a_ptr, dx_ptr, M, N, K, R, scaling,
                HALF_BLOCK: tl.constexpr, ROWS_ALIGNED: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr,
                INTERP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # output tile dx^T[BLOCK_K, BLOCK_M] = W[:, BLOCK_K]^T dy[BLOCK_M, :]^T, reduced over W's rows (N) in steps of BLOCK_N
    pid_m, pid_k = _tile_ids(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    tokens = offs_m[None, :].to(tl.int64)
    acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        dyt = tl.load(dy_ptr + tokens * N + (n0 + offs_n)[:, None],
                      mask=((n0 + offs_n)[:, None] < N) & (offs_m[None, :] < M), other=0.0)
        wt = _wt_tile(data_ptr, scale_ptr, pair_ptr, n0 + offs_n, k0, N, K, HALF_BLOCK, BLOCK_K, ROWS_ALIGNED,
                      dy_ptr.dtype.element_ty, INTERP)
        acc = tl.dot(wt, _operand(dyt, INTERP), acc, input_precision=DOT_PRECISION)
    if HAS_LORA:  # + scaling * A^T g^T, g = dy B precomputed [M, R]
        offs_r = tl.arange(0, BLOCK_R)
        at = tl.load(a_ptr + offs_r[None, :].to(tl.int64) * K + offs_k[:, None],
                     mask=(offs_k[:, None] < K) & (offs_r[None, :] < R), other=0.0)
        gt = tl.load(g_ptr + tokens * R + offs_r[:, None], mask=(offs_r[:, None] < R) & (offs_m[None, :] < M),
                     other=0.0)
        acc += scaling * tl.dot(_operand(at, INTERP), _operand(gt, INTERP), input_precision=DOT_PRECISION)
    _store(dx_ptr + tokens * K + offs_k[:, None], acc, (offs_k[:, None] < K) & (offs_m[None, :] < M), INTERP)


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if tuple(t.shape) != shape or t.dtype != dtype or t.device != device or not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous {dtype} tensor of shape {shape} on {device}, got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device} (contiguous={t.is_contiguous()})")


def _common(a: torch.Tensor, qt: "Packed4bit", scales: torch.Tensor, lora_in, lora_w, what: str):
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


def linear_4bit(x: torch.Tensor, qt: "Packed4bit", scales: torch.Tensor, lora_in: torch.Tensor | None = None,
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
        _fwd_kernel[grid](x, qt.data, scales, code_pairs(qt.code), lora_in if r else x, lora_w if r else x,
                          bias if bias is not None else x, y, m, n, k, r, float(scaling),
                          HALF_BLOCK=qt.blocksize // 2, ROWS_ALIGNED=k % qt.blocksize == 0,
                          HAS_LORA=bool(r), HAS_BIAS=bias is not None, BLOCK_R=block_r,
                          INTERP=INTERPRET, DOT_PRECISION=precision)
    return y


def linear_4bit_t(dy: torch.Tensor, qt: "Packed4bit", scales: torch.Tensor, lora_in: torch.Tensor | None = None,
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
        _bwd_kernel[grid](dy, qt.data, scales, code_pairs(qt.code), lora_in if r else dy, lora_w if r else dy, dx,
                          m, n, k, r, float(scaling), HALF_BLOCK=qt.blocksize // 2, ROWS_ALIGNED=k % qt.blocksize == 0,
                          HAS_LORA=bool(r), BLOCK_R=block_r,
                          INTERP=INTERPRET, DOT_PRECISION=precision)
    return dx
