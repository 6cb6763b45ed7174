"""Decode llama.cpp's legacy block types (Q4_0, Q4_1, Q8_0) in torch, bit for bit `gguf.quants`.

    decode_blocks(rows, GGMLQuantizationType.Q4_1, out)   # rows: uint8 [n, bytes per row] -> out [n, cols]

Each block holds 32 values: an f16 scale d (Q4_1: then an f16 minimum m) and 32 codes,
4-bit ones packed two to a byte (low nibbles are values 0-15, high nibbles 16-31).
    Q4_0: d * (q - 8)      Q4_1: d * q + m      Q8_0: d * q (q int8)
in float32, multiply then add, as `gguf.quants` computes them in numpy (the oracle in
tests/model/test_ggml_blocks.py), at a fraction of its time: its row groups and temporaries
took 3.5 s of a 135M model's 7 s load. Other types are left to `gguf.quants`.
"""
from __future__ import annotations

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The f16 at byte `start` of each block, as float32 [blocks, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def decode_blocks(rows: torch.Tensor, ggml_type: int, out: torch.Tensor) -> None:
    """Decode uint8 `rows` [n, bytes] of `ggml_type` (one of TYPES) into float32 `out` [n, cols]."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    blocks = rows.reshape(-1, size)
    values = out.view(-1, block)
    d = _f16(blocks, 0)
    if ggml_type == GGMLQuantizationType.Q8_0:
        torch.mul(blocks[:, 2:].view(torch.int8), d, out=values)
        return
    codes = blocks[:, -block // 2 :]
    q = torch.cat((codes & 0x0F, codes >> 4), dim=1)
    if ggml_type == GGMLQuantizationType.Q4_0:
        torch.mul(q.to(torch.int8) - 8, d, out=values)
    else:
        torch.mul(q, d, out=values)
        values.add_(_f16(blocks, 2))
