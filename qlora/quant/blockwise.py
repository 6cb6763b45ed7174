"""Block-wise quantization in pure PyTorch: the reference every fast kernel must match.

    q, absmax = quantize_4bit_ref(x, code, blocksize)      # packed nibbles + fp32 scales
    y = dequantize_4bit_ref(q, absmax, code, blocksize, n)  # float32, flat

Semantics (formats.md sections 2 and 3, matching bitsandbytes bit for bit):
- the flat tensor is cut into runs of `blocksize` elements (the last may be partial);
- absmax is max |x| per block in float32; x is normalized by multiplying with 1/absmax
  (the partial last block divides, as bitsandbytes does) and clamped to [-1, 1];
- the nearest code wins, a tie going to the lower value (bucketize, right=False);
- element 2j goes to the high nibble of byte j, element 2j+1 to the low nibble;
- decoding is code[nibble] * absmax in float32, rounded once to the output dtype.
The 8-bit codes (double quantization's block scales, the 8-bit optimizer state) are in
blockwise8.py.
"""
from __future__ import annotations

import torch

TINY = 1e-38
"""Scales are clamped to this before taking 1/absmax, so all-zero blocks decode to 0."""


def sort_order(code: torch.Tensor) -> torch.Tensor:
    """Code indices in ascending order of value (NF4/INT4: identity; FP4: a permutation)."""
    return torch.argsort(code)


def thresholds(code: torch.Tensor) -> torch.Tensor:
    """Float32 midpoints between neighbouring code values, in ascending order."""
    ordered = code[sort_order(code)]
    return (ordered[:-1] + ordered[1:]) / 2


def _block_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block, x normalized to [-1, 1]) for a flat float32 tensor."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=TINY)).view(-1, 1), -1, 1).reshape(-1)
    if full < n:
        # bitsandbytes divides the partial last block and stores its clamped scale.
        tail_max = flat[full:].abs().amax().clamp(min=TINY)
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return absmax, scaled


def nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the nearest code value; ties go to the lower value."""
    return sort_order(code)[torch.bucketize(scaled, thresholds(code), right=False)]


def quantize_4bit_ref(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `x` (any shape, float) to packed 4-bit codes [(n+1)//2] uint8 and fp32 absmax."""
    flat = x.reshape(-1).float()
    absmax, scaled = _block_scale(flat, blocksize)
    if scaled.numel() % 2:  # the padding nibble is the code of 0, as in bitsandbytes
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    q = nearest(scaled, code.to(flat.device)).to(torch.uint8)
    return pack_4bit(q), absmax


def pack_4bit(q: torch.Tensor) -> torch.Tensor:
    """Pack an even number of 4-bit codes (element order) into bytes, high nibble first."""
    q = q.reshape(-1).to(torch.uint8)
    return (q[0::2] << 4) | q[1::2]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first n 4-bit codes (int64) of a packed uint8 tensor, in element order."""
    packed = packed.reshape(-1)
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n].long()


def dequantize_4bit_ref(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    n: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode n elements: code[nibble] * absmax[i // blocksize] in float32, cast to dtype."""
    values = code.to(packed.device)[unpack_4bit(packed, n)]
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (values * scale).to(dtype)
