"""Code books: the 16 values a 4-bit code can mean, and the 8-bit dynamic maps.

- NF4 (NormalFloat4): 16 quantiles of N(0, 1) scaled to [-1, 1] with an exact 0
  (QLoRA, section 3). `NF4` is the table bitsandbytes ships; `derive_nf4()` rebuilds
  it from the inverse normal CDF, bit for bit (a test checks this).
- FP4: bitsandbytes' 4-bit float (sign bit 3, magnitudes 0, 1/192, 2/3, 1, 1/3, 1/2,
  1/6, 1/4). Not OCP E2M1.
- INT4: symmetric absmax integers, q in [-8, 7], value q / 7 (qlora's own format,
  stored offset by 8 so code 8 is the integer 0).
- `dynamic_map(signed)`: bitsandbytes' 8-bit dynamic-exponent map, used for the
  double-quantized block scales (signed) and for 8-bit Adam's second moment (unsigned).

Every table is float32, indexed by code. `thresholds(code)` gives the decision
midpoints between neighbouring values in sorted order; `nearest()` in blockwise.py
uses them, ties going to the lower code.
"""
from __future__ import annotations

import functools

import torch

from ..errors import InputError

QUANT_TYPES = ("nf4", "fp4", "int4")

NF4 = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

_FP4_MAGNITUDES = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]) / 12.0
FP4 = torch.cat([_FP4_MAGNITUDES, -_FP4_MAGNITUDES]).to(torch.float32)

INT4 = ((torch.arange(16, dtype=torch.float32) - 8.0) / 7.0).to(torch.float32)
"""Code c means the integer c - 8; the value is (c - 8) / 7 so absmax maps to 7."""

NF4_OFFSET = 0.9677083
"""Outermost probability point of NF4: about the mean of 1 - 1/30 and 1 - 1/32."""


def derive_nf4(offset: float = NF4_OFFSET) -> torch.Tensor:
    """Rebuild the NF4 table from standard-normal quantiles.

    Probability points are built in float32 (as bitsandbytes does), the inverse CDF is
    taken in float64, the 16 values are cast to float32, sorted and divided by the max.
    """
    positive = torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1].double()
    negative = torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1].double()
    values = torch.cat(
        [torch.special.ndtri(positive), torch.zeros(1, dtype=torch.float64), -torch.special.ndtri(negative)]
    ).float()
    values = values.sort().values
    return values / values.max()


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic map (7 decades, 256 float32 values, sorted).

    Decade i (scale 10^(i-6)) holds the midpoints of linspace(0.1, 1, k + 1) with
    k = 2^i (signed, mirrored) or 2^(i+1) (unsigned); then 0 and +1.0 are added.
    """
    values: list[torch.Tensor] = []
    for i in range(7):
        k = 2**i if signed else 2 ** (i + 1)
        bounds = torch.linspace(0.1, 1.0, k + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values.append(10 ** (i - 6) * means)
        if signed:
            values.append(-(10 ** (i - 6)) * means)
    values.append(torch.tensor([0.0, 1.0]))
    table = torch.cat(values).to(torch.float32).sort().values
    assert table.numel() == 256, table.numel()
    return table


@functools.cache
def _dynamic(signed: bool) -> torch.Tensor:
    return dynamic_map(signed)


def codebook(quant_type: str) -> torch.Tensor:
    """The 16-entry float32 table of `quant_type` ("nf4", "fp4" or "int4")."""
    tables = {"nf4": NF4, "fp4": FP4, "int4": INT4}
    if quant_type not in tables:
        raise InputError(f"unknown quant_type {quant_type!r}: expected one of {', '.join(QUANT_TYPES)}")
    return tables[quant_type]


def signed_dynamic_map() -> torch.Tensor:
    """The signed 8-bit map (double quantization of block scales, Adam's m)."""
    return _dynamic(True)


def unsigned_dynamic_map() -> torch.Tensor:
    """The unsigned 8-bit map (Adam's v)."""
    return _dynamic(False)
