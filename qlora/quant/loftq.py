"""LoftQ initialisation: a 4-bit base Q and a rank-r adapter B A with W ~ dequant(Q) + B A.

    qt, A, B = loftq_init(w, rank=64, iters=5)       # A [r, in], B [out, r], float32
    # a LoRA layer with scaling = lora_alpha / r = 1 then computes x (Q + B A)^T

LoftQ (Li et al. 2023), alternating: Q = quantize(W - B A); B A = best rank-r approximation
(truncated SVD) of W - dequant(Q). The SVD U S V^T is split as PEFT 0.21.2 does
(peft/utils/loftq_utils.py): B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T, float32, with no
lora_alpha / r folded in: PEFT writes these A and B into lora_A / lora_B as they are, so the
LoRA model reproduces W only when scaling = 1 (lora_alpha = r). `scaling` divides both
factors by sqrt(scaling) for other lora_alpha (scaling * B A is then the same product).

`quantizer(residual) -> QuantizedTensor` replaces absmax NF4 (e.g. GPTQ with a layer's
Hessian: functools.partial(gptq_quantize, hessian=H)). PEFT itself quantizes without
double quantization; `double_quant` (default on, the QLoRA recipe) only applies to the
default quantizer. Tests: tests/quant/test_loftq.py.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .tensor import QuantizedTensor, quantize


@torch.no_grad()
def loftq_init(
    weight: torch.Tensor,
    rank: int,
    iters: int = 1,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    quantizer: Callable[[torch.Tensor], QuantizedTensor] | None = None,
    scaling: float = 1.0,
) -> tuple[QuantizedTensor, torch.Tensor, torch.Tensor]:
    """(Q, A [rank, in], B [out, rank]) after `iters` alternations; see the module docstring."""
    if weight.dim() != 2:
        raise ValueError(f"loftq_init needs a 2-D weight, got shape {tuple(weight.shape)}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if not 0 < rank <= min(weight.shape):
        raise ValueError(f"rank must be in 1..{min(weight.shape)} for weight {tuple(weight.shape)}, got {rank}")
    if quantizer is None:
        def quantizer(res: torch.Tensor) -> QuantizedTensor:
            return quantize(res, quant_type, blocksize, double_quant)
    w = weight.float()
    res = w
    for i in range(iters):
        qt = quantizer(res)  # the float32 residual, as PEFT; stored under the weight's dtype
        qt.dtype = weight.dtype
        U, S, Vh = torch.linalg.svd(w - qt.dequantize(torch.float32), full_matrices=False)
        root = torch.sqrt(S[:rank])
        B, A = U[:, :rank] * root, root.unsqueeze(1) * Vh[:rank]
        if i + 1 < iters:
            res = w - B @ A
    if scaling != 1.0:
        B, A = B / math.sqrt(scaling), A / math.sqrt(scaling)
    return qt, A.contiguous(), B.contiguous()
