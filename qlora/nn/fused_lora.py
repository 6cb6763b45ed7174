"""The fused GPU path of LoraLinear over a Linear4bit: one Triton GEMM per direction.

    if fused_lora.usable(base, x):           # what LoraLinear.forward does (base: its Linear4bit)
        y = fused_lora.forward(x, base, lora_a, lora_b, scaling, dropout_p)

Forward   y  = x W^T + b + s (h A^T) B^T         h = dropout(x), s = scaling, W = dequant(qt)
Backward  dx = dy W + s (dy B) A                  (the LoRA term through dropout's backward)
          dA = s (dy B)^T h,  dB = s dy^T (h A^T),  db = sum of dy over the rows (if b needs it)
The base product and the LoRA term share one kernel: W is decoded tile by tile inside the
GEMM's K loop (kernels/triton_matmul.py, no full 16-bit W in memory) and s (h A^T) B^T, with the
rank-r xa = h A^T computed by a small matmul first, is added in the epilogue before the
single rounding to x's dtype; backward does the same with dy B and A. dA and dB are plain
(small) matmuls. With active dropout the LoRA gradient must pass dropout's backward, so
the backward kernel computes dy W alone and the LoRA input gradient s (dy B) A is returned
for h (autograd routes it through the dropout mask).
Saved for backward: the QuantizedTensor (a reference to the packed weight, no copy), h in
the compute dtype (x itself when there is no dropout and x is already in that dtype; with
dropout, the seeded-dropout output, whose mask SeededDropout regenerates for its backward),
xa = h A^T [rows, r], and references to the A and B parameters. Not saved: W decoded, y.
Strategy (STRATEGY): "fused" (the kernels above, the default) or "workspace" (Triton decode
of W into the shared workspace + cuBLAS, the same Function, saved state and LoRA math):
at many rows per call the decode-once product may win; benchmarks/gpu.py measures both.
Selected by LoraLinear when usable() (and the adapter is not merged): a Linear4bit base, the input on a device in
DEVICE_TYPES (empty unless QLORA_FUSED_LORA=1: opt-in, see DEVICE_TYPES) of compute capability 8.0 or newer, triton importable,
QLORA_KERNELS != "reference", an even in_features. (The fused path calls the Function
directly: hooks registered on the base layer's forward do not run on it.)
Otherwise LoraLinear runs the pure-PyTorch path (the oracle).
Tests: tests/nn/test_triton_lora.py (`pytest -k triton`, under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .. import kernels
from ..quant.tensor import QuantizedTensor
from .dropout import Seed, SeededDropout, new_seed
from .linear4bit import Linear4bit, workspace

DEVICE_TYPES = {"cuda"} if os.environ.get("QLORA_FUSED_LORA") == "1" else set()
"""Input devices that take the fused path: none unless QLORA_FUSED_LORA=1 (tests add "cpu" under
TRITON_INTERPRET=1). Opt-in because on an H200 (benchmarks/gpu.py, 2026-11-28) the fused GEMMs
took 10.5x a bf16 nn.Linear + LoRA at x [16384, 4096], while the default path (Triton decode
into the workspace, then cuBLAS) took 1.04x. The GEMMs have since been restructured (triton_matmul.py:
W as the register operand, one look-up per byte); not yet timed on a GPU."""
STRATEGY = "fused"
""""fused" (decode W tile by tile inside the GEMM) or "workspace" (decode W once, then cuBLAS)."""


def _triton():
    """The triton_matmul module, or None where triton does not import."""
    if kernels.triton_module() is None:
        return None
    from ..kernels import triton_matmul
    return triton_matmul


MIN_CUDA_CAPABILITY = (8, 0)
"""The fused GEMMs need Ampere or newer (bf16 tensor cores); older cards keep the PyTorch path."""
_ARCH_OK: dict[torch.device, bool] = {}


def arch_ok(device: torch.device) -> bool:
    """True unless `device` is a CUDA device older than MIN_CUDA_CAPABILITY."""
    if device.type != "cuda":
        return True
    if device not in _ARCH_OK:
        _ARCH_OK[device] = torch.cuda.get_device_capability(device) >= MIN_CUDA_CAPABILITY
    return _ARCH_OK[device]


def usable(base: nn.Module, x: torch.Tensor) -> bool:
    """True when a LoRA over `base` can take the fused path for `x` (see the module docstring)."""
    return (isinstance(base, Linear4bit) and x.device.type in DEVICE_TYPES and base.in_features % 2 == 0
            and arch_ok(x.device) and _triton() is not None)


def forward(x: torch.Tensor, base: Linear4bit, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
            dropout_p: float = 0.0, seed: Seed | None = None) -> torch.Tensor:
    """base(x) + scaling * dropout(x) lora_a^T lora_b^T on the fused path (the caller checked
    usable()); `dropout_p` > 0 only in training (the seeded dropout of nn/dropout.py, with
    `seed`, or a new one)."""
    if x.shape[-1] != base.in_features:
        raise ValueError(f"LoraLinear({base.in_features} -> {base.out_features}) got input of shape {tuple(x.shape)}")
    h = None
    if dropout_p > 0:  # the PyTorch path's masks
        h = SeededDropout.apply(x, dropout_p, new_seed(x.device) if seed is None else seed)
    with torch.autocast(x.device.type, enabled=False):  # the compute dtype is explicit here
        return FusedLoraLinear4bit.apply(x, h, base.weight, base.bias, lora_a, lora_b, scaling, base.compute_dtype)


class FusedLoraLinear4bit(torch.autograd.Function):
    """y = x W^T + b + s (h A^T) B^T with W = dequant(qt); see the module docstring.

    `h` is None when there is no active dropout (then h = x and the LoRA input gradient is
    fused into dx). Computes in `compute_dtype` with float32 accumulation; y in x.dtype;
    gradients of A, B and b in their own dtypes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, h: torch.Tensor | None, qt: QuantizedTensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, compute_dtype: torch.dtype):
        dt = compute_dtype
        k, n = x.shape[-1], qt.shape[0]
        x2 = x.reshape(-1, k).to(dt).contiguous()
        h2 = x2 if h is None else h.reshape(-1, k).to(dt).contiguous()
        a, b = lora_a.to(dt), lora_b.to(dt).contiguous()
        xa = h2 @ a.t()
        bias_dt = None if bias is None else bias.to(dt)
        y = _base_and_lora(x2, qt, xa, b, scaling, bias_dt, x.dtype)
        ctx.save_for_backward(h2, xa, lora_a, lora_b)
        ctx.qt, ctx.scaling, ctx.compute_dtype, ctx.fused_h = qt, scaling, dt, h is None
        ctx.x_dtype, ctx.bias_dtype = x.dtype, None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        h2, xa, lora_a, lora_b = ctx.saved_tensors
        dt, s, qt = ctx.compute_dtype, ctx.scaling, ctx.qt
        k, n = qt.shape[1], qt.shape[0]
        dy = grad_y.reshape(-1, n).to(dt).contiguous()
        a, b = lora_a.to(dt).contiguous(), lora_b.to(dt)
        g = dy @ b  # [rows, r]: the gradient of xa, up to the factor s
        grad_x = grad_h = grad_b = grad_a = grad_lb = None
        if ctx.needs_input_grad[0]:
            lora = (g, a) if ctx.fused_h else (None, None)
            grad_x = _base_t_and_lora(dy, qt, *lora, s, ctx.x_dtype).view(*grad_y.shape[:-1], k)
        if ctx.needs_input_grad[1]:
            grad_h = (torch.mm(g, a) * s).to(ctx.x_dtype).view(*grad_y.shape[:-1], k)  # h = dropout(x): x.dtype
        if ctx.needs_input_grad[3]:
            grad_b = dy.sum(0).to(ctx.bias_dtype)
        if ctx.needs_input_grad[4]:
            grad_a = (g.t() @ h2).mul_(s).to(lora_a.dtype)
        if ctx.needs_input_grad[5]:
            grad_lb = (dy.t() @ xa).mul_(s).to(lora_b.dtype)
        return grad_x, grad_h, None, grad_b, grad_a, grad_lb, None, None


def _base_and_lora(x2, qt, xa, b, s, bias, out_dtype) -> torch.Tensor:
    if STRATEGY == "workspace":
        w = workspace(qt.shape, x2.dtype, x2.device)
        qt.dequantize(out=w)
        y = torch.addmm(xa @ b.t(), x2, w.t(), alpha=1.0, beta=s) if bias is None else \
            torch.addmm(bias, x2, w.t()).add_(xa @ b.t(), alpha=s)
        return y.to(out_dtype)
    tm = _triton()
    scales = tm.triton_decode.block_scales(qt)
    return tm.linear_4bit(x2, qt, scales, xa.contiguous(), b, s, bias, out_dtype)


def _base_t_and_lora(dy, qt, g, a, s, out_dtype) -> torch.Tensor:
    if STRATEGY == "workspace":
        w = workspace(qt.shape, dy.dtype, dy.device)
        qt.dequantize(out=w)
        dx = dy @ w if g is None else torch.addmm(g @ a, dy, w, beta=s)
        return dx.to(out_dtype)
    tm = _triton()
    scales = tm.triton_decode.block_scales(qt)
    return tm.linear_4bit_t(dy, qt, scales, None if g is None else g.contiguous(), a, s, out_dtype)


