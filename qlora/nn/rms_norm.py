"""RMSNorm in float32, returning its input's dtype, in one kernel forward.

    norm = RMSNorm.from_module(model.model.norm)    # a Llama-style RMSNorm (LLAMA_STYLE), weight in fp32
    y = norm(x)                                      # x's dtype; y = w * x / rms(x), computed in fp32

The norm prepare_model keeps in fp32 (model/prepare.py: keep_norms_fp32) for the RMSNorms of
Llama, Mistral, Qwen2/3 and Phi-3: y = (w * (x_f32 * rsqrt(mean(x_f32^2) + eps))).to(x.dtype),
w in float32. The reference (`rms_norm_ref`: the oracle, and what QLORA_KERNELS=reference and
torch.compile run) is that formula op by op, as transformers' forward runs it behind the fp32
hooks. The default is torch's `_fused_rms_norm`: one launch on CUDA (on the CPU torch composes it
of eight aten ops inside the one call), the same bits on the CPU (tested;
CUDA's kernel sums the squares in another order, within float32 rounding: benchmarks/gpu.py
checks it); where a device's torch cannot run it, the formula (one warning). Its backward is
seven elementwise launches instead of autograd's fourteen:
    xhat = x rstd,  g = dy w,  dx = rstd (g - xhat mean(g xhat)),  dw = sum over rows of dy xhat
(float32 throughout, dx rounded once to x's dtype; within float32 rounding of autograd's, tested).
Saved for backward: x itself (not the fp32 copy the op-by-op form saves) and rstd [rows, 1] in
float32.
Tests: tests/nn/test_rms_norm.py.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .. import kernels

LLAMA_STYLE = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen2MoeRMSNorm",
                         "Qwen3RMSNorm", "Qwen3MoeRMSNorm", "Phi3RMSNorm"})
"""transformers RMSNorm classes of the Llama form: weight * normalized x, eps in `variance_epsilon`
(Gemma's scales by 1 + weight, and keeps its own forward)."""


_UNFUSED: dict[str, str] = {}
"""Device types where the fused kernel raised (the reason): they run rms_norm_ref."""


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The oracle: transformers' Llama RMSNorm on x in float32, returned in x's dtype."""
    xf = x.float()
    return (weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


class _FusedRMSNorm(torch.autograd.Function):
    """rms_norm_ref(x, weight, eps) forward in one launch; see the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x * rstd  # float32 (rstd is)
        g = dy * weight if weight.dtype == torch.float32 else dy.float() * weight  # float32
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dot = (g * xhat).mean(-1, keepdim=True)
            dx = torch.addcmul(g, xhat, dot, value=-1).mul_(rstd).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = (dy * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return dx, dw, None


class RMSNorm(nn.Module):
    """y = (w * x / rms(x)).to(x.dtype) in float32 (see the module docstring); `weight` in float32."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight, self.eps = weight, eps

    @classmethod
    def from_module(cls, module: nn.Module) -> "RMSNorm":
        """The same norm over `module`'s weight (the same Parameter, upcast to float32 if it is not)."""
        w = module.weight
        if w.dtype != torch.float32:
            w = nn.Parameter(w.detach().float(), requires_grad=w.requires_grad)
        return cls(w, float(module.variance_epsilon))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.weight.shape[0]:  # before the kernel: its error would read as a missing kernel
            raise ValueError(f"RMSNorm({self.weight.shape[0]}) got input of shape {tuple(x.shape)}")
        if kernels.reference_only() or torch.compiler.is_compiling() or x.device.type in _UNFUSED:
            return rms_norm_ref(x, self.weight, self.eps)
        try:
            if torch.is_autocast_enabled(x.device.type):  # float32 whatever autocast's list says of the op
                with torch.autocast(x.device.type, enabled=False):
                    return _FusedRMSNorm.apply(x, self.weight, self.eps)
            return _FusedRMSNorm.apply(x, self.weight, self.eps)
        except (RuntimeError, NotImplementedError) as e:  # a torch or device without the kernel (or these dtypes)
            _UNFUSED[x.device.type] = f"{type(e).__name__}: {e}"
            warnings.warn(f"qlora: torch's fused RMSNorm does not run on {x.device.type} here ({e}); "
                          "using the op-by-op formula (the same values, more launches)", stacklevel=2)
            return rms_norm_ref(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"({self.weight.shape[0]},), eps={self.eps}, float32"


def is_llama_style(module: nn.Module) -> bool:
    """A transformers RMSNorm of the Llama form: a class of LLAMA_STYLE whose forward is, op for
    op, LlamaRMSNorm's (a transformers that changes one keeps it on the fp32 hooks), a 1-D weight."""
    cls = type(module)
    if cls.__name__ not in LLAMA_STYLE or not hasattr(module, "variance_epsilon"):
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 1 and _llama_forward(cls.forward)


def _llama_forward(forward) -> bool:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    mine, llama = getattr(forward, "__code__", None), LlamaRMSNorm.forward.__code__
    return mine is not None and (mine.co_code, mine.co_consts, mine.co_names) == (llama.co_code, llama.co_consts,
                                                                                  llama.co_names)
