"""Triton decode of packed 4-bit weights (NF4 / FP4 / INT4, with or without double quant).

    triton_decode.decode_4bit(qt, out)     # out: contiguous bf16/fp16/fp32, qt.numel() elements
    scales = triton_decode.block_scales(qt)  # float32 scale per block (decodes DQ), for the GEMM

Used by kernels.decode_4bit for CUDA tensors; the fused LoRA GEMM (triton_matmul.py) decodes
its tiles with the same arithmetic (`code_pairs`, `decode_bytes`, `block_scales`). Bit for bit
the arithmetic of blockwise.py (formats.md 2-3):
- byte j holds elements 2j (high nibble) and 2j+1 (low nibble); both lie in block
  j // (blocksize / 2), since blocks have an even size;
- scale = absmax[b], or with double quant nested_code[q[b]] * nested_absmax[b // 256] +
  nested_offset, a float32 product rounded before the add (launched with
  enable_fp_fusion=False, so the compiler may not contract it into an FMA);
- out = code[nibble] * scale in float32, rounded once to the output dtype; both codes of a
  byte come from one look-up in a 256-entry table of float32 pairs (`code_pairs`).
Instructions count: at ~2.5 bytes moved per weight an H200 SM must retire a weight every
~16 instruction slots to keep up with its memory; the kernel timed on the H200 used 17.5
(sm_90 SASS, 2048 bytes x 8 warps). The pair table, int32 offsets inside a program,
unmasked full programs and the hardware bf16 rounding bring it to 8.5 (triton 3.9; 10.0
with 3.6) (benchmarks/sass.py, docs/benchmarks.md).
Note: bf16 rounding. Triton's interpreter rounds float32 -> bf16 toward zero and its
tl.dot reads bf16 as raw integers; the GPU rounds to nearest even (cvt.rn). `to_bf16`
rounds to nearest even with integer arithmetic; the decode and the GEMM use it, and upcast
dot operands, only where INTERPRET is true.
INTERPRET is read when this module is imported (triton.jit decides then): tests set
TRITON_INTERPRET=1 before importing it and run the kernels on CPU tensors.
Tests: tests/kernels/test_triton_decode.py (`pytest -k triton`).
"""
from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakTensorKeyDictionary

from .packed import held, launch_key

if TYPE_CHECKING:
    from .packed import Packed4bit

try:
    INTERPRET: bool = bool(triton.knobs.runtime.interpret)
except AttributeError:  # triton < 3.4 has no knobs; it reads the variable the same way
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
"""True when the kernels below were built for Triton's CPU interpreter (TRITON_INTERPRET=1)."""

DECODE_BYTES = 2048
"""Packed bytes (4096 outputs) per decode program; with 8 warps, 8 bytes in and 16 values out per thread."""
DECODE_WARPS = 8
LAUNCH = {"enable_fp_fusion": False}
"""Launch options of the decode kernels: no FMA contraction (exact scales; checked in the PTX by a test)."""
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_NO_CONTEXT = contextlib.nullcontext()


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context for a launch on t's tensors: Triton launches on the *current* CUDA device, so
    without it a model on cuda:1 in a process whose current device is cuda:0 would fault. A
    no-op where the process sees one CUDA device (it is the current one): two device switches less a launch."""
    if t.device.type != "cuda" or torch.cuda.device_count() < 2:
        return _NO_CONTEXT
    return torch.cuda.device(t.device)


@triton.jit
def to_bf16(v):
    """float32 -> bfloat16, round to nearest even (exact on the interpreter as on the GPU); a NaN
    stays a (quiet) NaN: rounding its bits would carry the GPU's 0x7FFFFFFF NaN into -0.0."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, (bits >> 16) | 0x40, rounded)
    return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def cast_out(v, dtype: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """Round float32 `v` once to `dtype` (nearest even)."""
    if MANUAL_BF16 and dtype == tl.bfloat16:
        out = to_bf16(v)
    else:
        out = v.to(dtype)
    return out


_PAIRS = WeakTensorKeyDictionary()


def code_pairs(code: torch.Tensor) -> torch.Tensor:
    """The byte -> (code[byte >> 4], code[byte & 15]) table: 256 int64 holding two float32 each
    (the high nibble's code in the low half), built once per code book (and per in-place change)."""
    cached = _PAIRS.get(code)
    if cached is None or cached[0] != code._version:
        byte = torch.arange(256, device=code.device)
        pairs = torch.stack([code[byte >> 4], code[byte & 15]], dim=1).float().contiguous().view(torch.int64)
        cached = _PAIRS[code] = (code._version, pairs.view(256))
    return cached[1]


@triton.jit
def decode_bytes(packed, pair_ptr, scale):
    """The two weights of each packed byte (int32) in float32, one table look-up for both:
    code[byte >> 4] * scale, code[byte & 15] * scale."""
    pair = tl.load(pair_ptr + packed)
    hi = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True) * scale
    lo = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True) * scale
    return hi, lo


@triton.jit
def block_scale(absmax_ptr, nested_ptr, nested_code_ptr, offset, blk, mask, DQ: tl.constexpr):
    """The float32 scale of blocks `blk` (0 where masked; `mask` None: every block exists)."""
    if mask is None:
        stored = tl.load(absmax_ptr + blk)
    else:
        stored = tl.load(absmax_ptr + blk, mask=mask, other=0)
    if DQ:
        if mask is None:
            nested = tl.load(nested_ptr + blk // 256)
        else:
            nested = tl.load(nested_ptr + blk // 256, mask=mask, other=0.0)
        scale = tl.load(nested_code_ptr + stored.to(tl.int32)) * nested + offset
        if mask is not None:
            scale = tl.where(mask, scale, 0.0)
    else:
        scale = stored
    return scale


@triton.jit
def _decode_kernel(data_ptr, absmax_ptr, nested_ptr, nested_code_ptr, offset, pair_ptr, out_ptr, n, nbytes,
                   HALF_BLOCK: tl.constexpr, DQ: tl.constexpr, BYTES: tl.constexpr, COLS: tl.constexpr,
                   MANUAL_BF16: tl.constexpr, EVEN: tl.constexpr):
    # The program's BYTES bytes as a [BYTES // COLS, COLS] tile, COLS = min(HALF_BLOCK, BYTES):
    # every row lies in one block, so each row's scale is loaded once, not once per byte.
    # Offsets inside the program are int32 from one int64 base; EVEN: every program is full (no masks).
    first = tl.program_id(0).to(tl.int64) * BYTES
    r = tl.arange(0, BYTES // COLS)
    local = r[:, None] * COLS + tl.arange(0, COLS)[None, :]
    blk = (first + r * COLS) // HALF_BLOCK
    if EVEN:
        packed = tl.load(data_ptr + first + local)
        scale = block_scale(absmax_ptr, nested_ptr, nested_code_ptr, offset, blk, None, DQ)
    else:
        left = tl.minimum(nbytes - first, BYTES).to(tl.int32)
        packed = tl.load(data_ptr + first + local, mask=local < left, other=0)
        scale = block_scale(absmax_ptr, nested_ptr, nested_code_ptr, offset, blk, r * COLS < left, DQ)
    hi, lo = decode_bytes(packed.to(tl.int32), pair_ptr, scale[:, None])
    values = cast_out(tl.interleave(hi, lo), out_ptr.dtype.element_ty, MANUAL_BF16)
    idx = r[:, None] * (2 * COLS) + tl.arange(0, 2 * COLS)[None, :]  # row r: elements 2 (first + r COLS) + ...
    if EVEN:
        tl.store(out_ptr + 2 * first + idx, values)
    else:
        tl.store(out_ptr + 2 * first + idx, values, mask=idx < tl.minimum(n - 2 * first, 2 * BYTES).to(tl.int32))


@triton.jit
def _scales_kernel(absmax_ptr, nested_ptr, nested_code_ptr, offset, out_ptr, nblocks, BLOCK: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = blk < nblocks
    tl.store(out_ptr + blk, block_scale(absmax_ptr, nested_ptr, nested_code_ptr, offset, blk, mask, True), mask=mask)


def check(qt: "Packed4bit", what: str) -> None:
    """Raise if `qt` cannot be decoded here (the message names the tensor at fault)."""
    tensors = {"data": qt.data, "absmax": qt.absmax, "code": qt.code}
    if qt.double_quant:
        tensors.update(nested_absmax=qt.nested_absmax, nested_code=qt.nested_code)
    for name, t in tensors.items():
        if t.device != qt.data.device or not t.is_contiguous():
            raise ValueError(f"{what}: QuantizedTensor.{name} must be contiguous on {qt.data.device}, "
                             f"got device {t.device}, contiguous={t.is_contiguous()}")
    if qt.code.dtype != torch.float32 or qt.code.numel() != 16:
        raise ValueError(f"{what}: QuantizedTensor.code must be 16 float32 values, got {qt.code.dtype} "
                         f"{tuple(qt.code.shape)}")
    if qt.data.dtype != torch.uint8:
        raise ValueError(f"{what}: QuantizedTensor.data must be uint8, got {qt.data.dtype}")


def _nested_args(qt: "Packed4bit") -> tuple[torch.Tensor, torch.Tensor, float]:
    if qt.double_quant:
        return qt.nested_absmax, qt.nested_code, float(qt.nested_offset)
    return qt.absmax, qt.code, 0.0  # unused by the kernel (DQ=False); any valid pointers


def decode_4bit(qt: "Packed4bit", out: torch.Tensor, *, bytes_per_program: int = DECODE_BYTES,
                num_warps: int = DECODE_WARPS) -> None:
    """Decode `qt` into the contiguous float tensor `out` (same device, qt.numel() elements).

    `bytes_per_program` (a power of two >= 64) and `num_warps` only change the launch
    (benchmarks/gpu.py sweeps them), never the result. The checks and the launch's arguments
    are worked out once per (qt, out, launch) and kept on qt while out, qt's tensors, its code
    book and its layout are the same (packed.launch_key; a layer decodes into the same
    workspace every call)."""
    key = (out.data_ptr(), out.dtype, out.numel(), out.device, *launch_key(qt), bytes_per_program, num_warps)
    launch = qt.__dict__.get("_triton_launch")  # (key, qt's tensors, grid, arguments before out, after out, options)
    if launch is None or launch[0] != key or not out.is_contiguous():
        launch = qt.__dict__["_triton_launch"] = (key, held(qt), *_decode_launch(qt, out, bytes_per_program, num_warps))
    _, _, grid, head, tail, options = launch
    with on_device(out):
        _decode_kernel[grid](*head, out, *tail, **options)


def _decode_launch(qt: "Packed4bit", out: torch.Tensor, bytes_per_program: int, num_warps: int) -> tuple:
    """decode_4bit's checks, then its launch: (grid, arguments before out, after out, options)."""
    check(qt, "triton decode_4bit")
    if out.dtype not in OUT_DTYPES or not out.is_contiguous() or out.device != qt.data.device:
        raise ValueError(f"triton decode_4bit: out must be a contiguous float32/float16/bfloat16 tensor on "
                         f"{qt.data.device}, got {out.dtype} on {out.device} (contiguous={out.is_contiguous()})")
    n = qt.numel()
    if out.numel() != n:
        raise ValueError(f"triton decode_4bit: out has {out.numel()} elements, the weight {tuple(qt.shape)} has {n}")
    nbytes = (n + 1) // 2
    nested, nested_code, offset = _nested_args(qt)
    if bytes_per_program < 64 or bytes_per_program & (bytes_per_program - 1):
        raise ValueError(f"triton decode_4bit: bytes_per_program must be a power of two >= 64, got {bytes_per_program}")
    options = dict(HALF_BLOCK=qt.blocksize // 2, DQ=qt.double_quant, BYTES=bytes_per_program,
                   COLS=min(qt.blocksize // 2, bytes_per_program), MANUAL_BF16=INTERPRET,
                   EVEN=nbytes % bytes_per_program == 0 and n % 2 == 0, num_warps=num_warps, **LAUNCH)
    return ((triton.cdiv(nbytes, bytes_per_program),),
            (qt.data, qt.absmax, nested, nested_code, offset, code_pairs(qt.code)), (n, nbytes), options)


def block_scales(qt: "Packed4bit") -> torch.Tensor:
    """The float32 scale of every block: qt.absmax itself, or the decoded double quantization."""
    check(qt, "triton block_scales")
    if not qt.double_quant:
        return qt.absmax
    nblocks = qt.absmax.numel()
    out = torch.empty(nblocks, dtype=torch.float32, device=qt.data.device)
    nested, nested_code, offset = _nested_args(qt)
    with on_device(out):
        _scales_kernel[(triton.cdiv(nblocks, 1024),)](qt.absmax, nested, nested_code, offset, out, nblocks,
                                                       BLOCK=1024, num_warps=4, **LAUNCH)
    return out
