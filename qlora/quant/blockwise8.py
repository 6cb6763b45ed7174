"""8-bit block-wise codes over a 256-entry dynamic map: two quantizers, named by how they round,
and one decoder.

    q, absmax = quantize_8bit_grid(x, code, blocksize)   # bitsandbytes' CPU quantizer, bit for bit
    q, absmax = quantize_8bit_nearest(x, signed)         # the nearest code, blocks of 256
    y = dequantize_8bit(q, absmax, code, blocksize)      # code[q] * absmax[i // blocksize], float32

- grid: x * (1/absmax) is snapped to a 65536-point grid on [-1, 1] and the grid point's
  nearest code is used, as bitsandbytes' CPU kernel does; this differs from the true nearest
  code only within 2e-5 of a midpoint. Double quantization of the 4-bit block scales
  (tensor.py) uses it, so that the stored bytes are bitsandbytes'.
- nearest: the nearest map value, ties to the lower code, found by a bucket table equal to
  torch.bucketize on the midpoints (`nearest_code`), on flat float32 in blocks of BLOCK,
  writing into given outputs: the 8-bit AdamW state (optim/adamw.py, formats.md section 9).
The maps are codebooks.dynamic_map (signed: block scales, Adam's m; unsigned: Adam's v).
Tests: tests/quant/test_blockwise8.py (bitsandbytes and brute force are the references).
"""
from __future__ import annotations

import functools

import torch

from .blockwise import TINY
from .codebooks import signed_dynamic_map, unsigned_dynamic_map

BLOCK = 256
"""Elements per block of quantize_8bit_nearest (one float32 absmax each)."""

LUT_STEPS = 65536
"""bitsandbytes' CPU 8-bit quantizer snaps x/absmax to this many grid points in [-1, 1]."""


# ---- grid: bitsandbytes' rounding ---------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _grid_lut(code_bytes: bytes) -> torch.Tensor:
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    mids = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(LUT_STEPS, dtype=torch.float32)) / (LUT_STEPS - 1)
    return torch.bucketize(grid, mids, right=False).to(torch.uint8)


def quantize_8bit_grid(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise 8-bit quantization with a sorted 256-entry map: (uint8 codes in x's shape,
    fp32 absmax [ceil(n / blocksize)]), bit-exact with bitsandbytes' CPU kernel (the module
    docstring says how it rounds). All-zero blocks get code 0 and absmax 0.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = torch.cat([flat, flat.new_zeros((-n) % blocksize)]).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax).view(-1, 1)).clamp(-1, 1)
    grid_index = ((scaled + 1.0) * 0.5 * (LUT_STEPS - 1) + 0.5).long()
    lut = _grid_lut(code.detach().float().cpu().contiguous().numpy().tobytes()).to(flat.device)
    q = torch.where(absmax.view(-1, 1) > 0, lut[grid_index.clamp(0, LUT_STEPS - 1)], 0)
    return q.reshape(-1)[:n].to(torch.uint8).view(x.shape), absmax


# ---- nearest: the exact rounding, fast ----------------------------------------------------------
_MAPS: dict[tuple[torch.device, bool], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def dynamic_map_on(device: torch.device, signed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(256-entry map, bucket counts, bucket midpoints) on `device`, cached.

    Note: nearest code by a 65536-bucket table, not a binary search. Bucket b holds the
    float32 values whose top 16 bits are b (sign, exponent, 7 mantissa bits: 0.8% wide).
    Both dynamic maps' codes are at least 1.4% apart, so a bucket contains at most one
    decision midpoint (asserted). counts[b] = number of midpoints below the bucket,
    mids[b] = the midpoint inside it (+inf if none); then
    code = counts[b] + (mids[b] < x) = the number of midpoints below x, which is exactly
    torch.bucketize(x, midpoints) with ties to the lower code, 4-6x faster on the CPU.
    """
    key = (torch.device(device), signed)
    if key not in _MAPS:
        table = signed_dynamic_map() if signed else unsigned_dynamic_map()
        midpoints = (table[:-1] + table[1:]) / 2
        bits = torch.arange(1 << 16, dtype=torch.int64) << 16
        as_int32 = [torch.where(b >= 1 << 31, b - (1 << 32), b).to(torch.int32) for b in (bits, bits | 0xFFFF)]
        ends = [b.view(torch.float32) for b in as_int32]  # the first and last float of each bucket
        low = torch.nan_to_num(torch.minimum(*ends), nan=0.0)  # NaN buckets: never hit by finite x
        high = torch.nan_to_num(torch.maximum(*ends), nan=0.0)
        counts = torch.searchsorted(midpoints, low)  # midpoints < low
        inside = torch.searchsorted(midpoints, high, right=True) - counts
        assert int(inside.max()) <= 1, "a bucket holds two midpoints: use more key bits"
        mids = torch.where(inside == 1, midpoints[counts.clamp(max=254)], torch.tensor(float("inf")))
        _MAPS[key] = (table.to(device), counts.to(torch.uint8).to(device), mids.to(device))
    return _MAPS[key]


def nearest_code(scaled: torch.Tensor, signed: bool) -> torch.Tensor:
    """uint8 index of the nearest dynamic-map value to each float32 in `scaled` (ties: lower)."""
    if scaled.dtype != torch.float32 or not scaled.is_contiguous():
        raise ValueError(f"nearest_code: expected contiguous float32, got {scaled.dtype} {tuple(scaled.shape)}")
    _, counts, mids = dynamic_map_on(scaled.device, signed)
    bucket = scaled.view(torch.int32).bitwise_right_shift(16).bitwise_and_(0xFFFF)  # top 16 bits
    return counts.index_select(0, bucket).add_(mids.index_select(0, bucket) < scaled)


def quantize_8bit_nearest(x: torch.Tensor, signed: bool, q: torch.Tensor | None = None,
                          absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise 8-bit quantize flat float32 `x`: (uint8 codes [n], float32 absmax [ceil(n/256)]).

    Writes into `q` and `absmax` when given. Nearest map value, ties to the lower code.
    """
    if x.dim() != 1 or x.dtype != torch.float32:
        raise ValueError(f"quantize_8bit_nearest: expected flat float32 x, got {x.dtype} {tuple(x.shape)}")
    n = x.numel()
    nblocks = -(-n // BLOCK)
    full = n - n % BLOCK
    if absmax is None:
        absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    if q is None:
        q = torch.empty(n, dtype=torch.uint8, device=x.device)
    if full:
        blocks = x[:full].view(-1, BLOCK)
        torch.amax(blocks.abs(), dim=1, out=absmax[: full // BLOCK])
        scaled = blocks * absmax[: full // BLOCK].clamp(min=TINY).reciprocal().unsqueeze(1)
        q[:full].copy_(nearest_code(scaled.view(-1), signed))
    if full < n:
        tail = x[full:]
        absmax[-1] = tail.abs().amax()
        q[full:].copy_(nearest_code(tail * absmax[-1].clamp(min=TINY).reciprocal(), signed))
    return q, absmax


# ---- decoding -----------------------------------------------------------------------------------
def dequantize_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = BLOCK) -> torch.Tensor:
    """code[q] * absmax[i // blocksize] in float32, in q's shape (either quantizer's codes)."""
    n = q.numel()
    if absmax.numel() != -(-n // blocksize):
        raise ValueError(f"dequantize_8bit: {n} codes need {-(-n // blocksize)} scales, got {absmax.numel()}")
    x = code.to(q.device).index_select(0, q.reshape(-1).int())
    full = n - n % blocksize
    if full:
        x[:full].view(-1, blocksize).mul_(absmax[: full // blocksize].float().unsqueeze(1))
    if full < n:
        x[full:].mul_(absmax[-1].float())
    return x.view(q.shape)
