"""Packed4bit: what the kernels read of a 4-bit weight, so that they need nothing above them.

qlora.quant.tensor.QuantizedTensor has exactly these fields (formats.md sections 2-4):
`data` uint8 [(n+1)//2, 1], two codes a byte, high nibble first; `absmax` one float32 scale
per block of `blocksize`, or with double quantization uint8 codes of (scale - nested_offset)
in `nested_code`, one float32 `nested_absmax` per NESTED_BLOCKSIZE blocks; `code` the 16
float32 values a nibble means.
"""
from __future__ import annotations

from typing import Protocol

import torch

NESTED_BLOCKSIZE = 256
"""Blocks per float32 nested scale of the double quantization (formats.md section 3); the C and
Triton decoders have it built in (`blk // 256`)."""


class Packed4bit(Protocol):
    data: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    shape: torch.Size
    nested_absmax: torch.Tensor | None
    nested_code: torch.Tensor | None
    nested_offset: float | None

    @property
    def double_quant(self) -> bool: ...

    def numel(self) -> int: ...


def launch_key(qt: Packed4bit) -> tuple:
    """What a kept launch of `qt` (its checked arguments, raw pointers included) depends on: the
    addresses of the tensors the kernel reads, the code book's version and the layout. A cache
    keyed by it also holds `held(qt)`, so no address in the key can be freed and reused."""
    nested = (qt.nested_absmax.data_ptr(), qt.nested_code.data_ptr()) if qt.double_quant else ()
    return (qt.data.data_ptr(), qt.absmax.data_ptr(), qt.code.data_ptr(), qt.code._version, *nested,
            qt.nested_offset, qt.blocksize, qt.numel())


def held(qt: Packed4bit) -> tuple[torch.Tensor, ...]:
    """The tensors a kept launch of `qt` reads (see launch_key)."""
    return (qt.data, qt.absmax, qt.code) + ((qt.nested_absmax, qt.nested_code) if qt.double_quant else ())
