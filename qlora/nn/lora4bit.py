"""LoRA over a Linear4bit in one autograd Function: LoraLinear's default path there.

    y = Lora4bitLinear.apply(x, A, B, qt, offset, bias, a16, b16, s, p, seed, dt)   # LoraLinear.forward calls it

Forward   h = dropout_p(x) (seeded: nn/dropout.py), xa = h A^T,  y = x W^T + b + s xa B^T
Backward  g = dy B,  dx = dy W + dropout_p(s g A),  dA = s g^T h,  dB = s dy^T xa,  db = sum of dy
          (h and dropout_p(s g A) come from one pass that makes the mask once: seeded_dropout_pair)
with W = dequant(qt) decoded into the shared workspace (nn/linear4bit.py), all in the compute
dtype `dt` (x is in it); a16, b16: A and B cast to `dt` by the caller (no autograd history),
gradients of A and B in their own dtypes. The same math as the two-Function path of
LoraLinear (Linear4bit's _DequantLinear, _DropoutA, addmm), which stays the oracle
(QLORA_KERNELS=reference takes it): one autograd node instead of five, and fewer launches
(benchmarks/host_step.py): s is folded into dropout's scale and into the gradient casts, the
LoRA input gradient is the `input` of the base gradient's addmm, and A and B are cast once
per call. While torch.compile traces, W is decoded and x dropped out through the custom ops
of nn/ops.py (a graph with no break).
Saved for backward: x (the layer's input itself, which q, k and v share, no copy), xa [rows, r],
a16, b16, the seed tensor; the QuantizedTensor by reference. Not saved: W, dropout(x), y.
`offset` (Linear4bit.nested_offset_tensor) is used only while torch.compile traces (nn/ops.py).
Tests: tests/nn/test_lora4bit.py.
"""
from __future__ import annotations

import torch

from ..quant.tensor import QuantizedTensor
from . import ops
from .dropout import Seed, seeded_dropout, seeded_dropout_pair
from .linear4bit import decode, decode_for_backward


def _weight(qt: QuantizedTensor, offset: torch.Tensor, dtype: torch.dtype, backward: bool = False) -> torch.Tensor:
    """W decoded: into the shared workspace when eager, through the custom op when torch.compile traces."""
    if torch.compiler.is_compiling():
        return ops.decode(qt, offset, dtype)
    return decode_for_backward(qt, dtype) if backward else decode(qt, dtype)


def _dropout(x: torch.Tensor, p: float, seed: Seed, gain: float = 1.0) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return ops.seeded_dropout(x, p, seed, gain)
    return seeded_dropout(x, p, seed, gain)


def _dropout_pair(x: torch.Tensor, g: torch.Tensor, p: float, seed: Seed, gain: float) -> tuple[torch.Tensor, ...]:
    if torch.compiler.is_compiling():
        return ops.seeded_dropout_pair(x, g, p, seed, gain)
    return seeded_dropout_pair(x, g, p, seed, gain)


class Lora4bitLinear(torch.autograd.Function):
    """y = x W^T + b + s dropout_p(x) A^T B^T; see the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, qt: QuantizedTensor,
                offset: torch.Tensor, bias: torch.Tensor | None, a16: torch.Tensor, b16: torch.Tensor, scaling: float,
                p: float, seed: Seed | None, compute_dtype: torch.dtype) -> torch.Tensor:
        n, k = qt.shape
        x2 = x.reshape(-1, k)
        w = _weight(qt, offset, compute_dtype)
        y = torch.nn.functional.linear(x2, w, None if bias is None else bias.to(compute_dtype))
        h = _dropout(x2, p, seed) if p > 0 else x2
        xa = h @ a16.t()
        y.addmm_(xa, b16.t(), alpha=scaling)
        ctx.save_for_backward(x2, xa, a16, b16, seed if p > 0 else None)
        ctx.qt, ctx.offset, ctx.scaling, ctx.p, ctx.compute_dtype = qt, offset, scaling, p, compute_dtype
        ctx.grad_dtypes = lora_a.dtype, lora_b.dtype, None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x2, xa, a16, b16, seed = ctx.saved_tensors
        s, p = ctx.scaling, ctx.p
        n, k = ctx.qt.shape
        dy = grad_y.reshape(-1, n).to(ctx.compute_dtype)
        g = dy @ b16  # [rows, r]: the gradient of xa, up to the factor s
        need_x, need_a = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ga = g @ a16 if need_x else None  # the LoRA input gradient before dropout, up to s
        h = dga = None  # dropout(x) for dA; s dropout(g A) for dx (s folded into dropout's scale)
        if p == 0:
            h = x2
        elif need_x and need_a:  # one mask, one pass for both
            h, dga = _dropout_pair(x2, ga, p, seed, s)
        elif need_x:
            dga = _dropout(ga, p, seed, gain=s)
        elif need_a:
            h = _dropout(x2, p, seed)
        grad_x = grad_a = grad_b = grad_bias = None
        if need_x:
            w = _weight(ctx.qt, ctx.offset, ctx.compute_dtype, backward=True)
            grad_x = torch.addmm(ga, dy, w, beta=s) if dga is None else torch.addmm(dga, dy, w)
            grad_x = grad_x.view(grad_y.shape[:-1] + (k,))
        if need_a:
            grad_a = torch.mul(g.t() @ h, s, out=a16.new_empty(a16.shape, dtype=ctx.grad_dtypes[0]))
        if ctx.needs_input_grad[2]:
            grad_b = torch.mul(dy.t() @ xa, s, out=b16.new_empty(b16.shape, dtype=ctx.grad_dtypes[1]))
        if ctx.needs_input_grad[5]:
            grad_bias = dy.sum(0).to(ctx.grad_dtypes[2])
        return grad_x, grad_a, grad_b, None, None, grad_bias, None, None, None, None, None, None
