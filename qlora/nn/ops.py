"""torch.library custom ops over qlora's kernels, so that torch.compile can trace a layer whole.

    w = torch.ops.qlora.decode_4bit(data, absmax, code, nested_absmax, nested_code, offset, blocksize, shape, dtype)
    h = torch.ops.qlora.seeded_dropout(x, p, seed, gain)
    h, d = torch.ops.qlora.seeded_dropout_pair(x, g, p, seed, gain)   # one mask for both

Each runs what the eager path runs (the C kernel on CPU, Triton on CUDA, else the pure-PyTorch
reference) into a fresh tensor; their fake implementations give the output's shape and dtype
to the tracer, so a compiled graph calls them as opaque kernels instead of breaking around
ctypes or Triton launches. The seed is a 0-dim int64 tensor (nn/dropout.py), an input of the
graph, never a constant frozen into it. lora4bit.py takes these ops while torch.compile traces
(`torch.compiler.is_compiling()`); eager calls keep the cheaper direct path.
Tests: tests/nn/test_compile.py.
"""
from __future__ import annotations

import torch

from ..quant.tensor import QuantizedTensor
from .dropout import seeded_dropout as _dropout
from .dropout import seeded_dropout_pair as _dropout_pair


@torch.library.custom_op("qlora::decode_4bit", mutates_args=())
def decode_4bit(data: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, nested_absmax: torch.Tensor | None,
                nested_code: torch.Tensor | None, nested_offset: torch.Tensor, blocksize: int, shape: list[int],
                dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] weight of these packed codes and scales, decoded to `dtype`; `nested_offset`
    a 0-dim CPU tensor (Linear4bit.nested_offset_tensor: read here, no device sync)."""
    qt = QuantizedTensor(data, absmax, torch.Size(shape), dtype, blocksize=blocksize, code=code,
                         nested_absmax=nested_absmax, nested_code=nested_code,
                         nested_offset=float(nested_offset) if nested_absmax is not None else None)
    return qt.dequantize(dtype)


@decode_4bit.register_fake
def _(data, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, shape, dtype):
    return data.new_empty(shape, dtype=dtype)


def decode(qt: QuantizedTensor, offset: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """qt decoded to `dtype` through the custom op; `offset`: qt.nested_offset as a 0-dim CPU tensor."""
    return decode_4bit(qt.data, qt.absmax, qt.code, qt.nested_absmax, qt.nested_code, offset, qt.blocksize,
                       list(qt.shape), dtype)


@torch.library.custom_op("qlora::seeded_dropout", mutates_args=())
def seeded_dropout(x: torch.Tensor, p: float, seed: torch.Tensor, gain: float) -> torch.Tensor:
    """nn/dropout.py seeded_dropout(x, p, seed, gain)."""
    return _dropout(x, p, seed, gain)


@seeded_dropout.register_fake
def _(x, p, seed, gain):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("qlora::seeded_dropout_pair", mutates_args=())
def seeded_dropout_pair(x: torch.Tensor, g: torch.Tensor, p: float, seed: torch.Tensor,
                        gain: float) -> tuple[torch.Tensor, torch.Tensor]:
    """nn/dropout.py seeded_dropout_pair(x, g, p, seed, gain)."""
    return _dropout_pair(x, g, p, seed, gain)


@seeded_dropout_pair.register_fake
def _(x, g, p, seed, gain):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(g, memory_format=torch.contiguous_format))
