"""Rotary position embedding of q and k in one kernel a direction, the same values as transformers'.

    q, k = apply_rotary(q, k, cos, sin)     # transformers' apply_rotary_pos_emb(q, k, cos, sin), fused
    n = use_fused_rotary(model)             # each attention of the Llama form calls it; n modules

transformers' `apply_rotary_pos_emb` (Llama and the models that copy it: Mistral, Qwen2/3, Gemma,
...) is q cos + rotate_half(q) sin op by op: ten launches forward for q and k, fourteen (and
four zero fills) backward, the most launches left in a layer's step (benchmarks/host_step.py).
With x = (x1, x2), cos = (c1, c2), sin = (s1, s2) split at half the head dim:
    forward   y1 = x1 c1 - x2 s1,   y2 = x2 c2 + x1 s2
    backward  dx1 = g1 c1 + g2 s2,  dx2 = g2 c2 - g1 s1
one launch each for q and k together (kernels.rotary: Triton on CUDA, C on the CPU), each product
and sum rounded to the dtype as the op-by-op form rounds it: the same values, forward and
backward (a zero's sign aside). `rotary_ref` (the oracle; what QLORA_KERNELS=reference and
torch.compile run) is that form; fake and other subclass tensors take it too. A backward that is
itself differentiated (create_graph), or with one output unused (its input's gradient stays None),
runs the backward formula op by op. Saved for backward: cos and sin (the layer's own, no copy).

`use_fused_rotary` installs it per attention module through the hook transformers gives each
one (`_kernel_funcs`, from the `kernels` package's use_kernelized_func): no transformers
function is replaced, other models in the process keep theirs. Only where the module's function
is, op for op, Llama's (its code and its rotate_half's), so a model with another rotary
(Phi-3's partial one, ...) keeps its own, as does every model where transformers gives no hook
(transformers 4, or without the `kernels` package).
Tests: tests/nn/test_rotary.py.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from .. import kernels

HOOK = "rotary_pos_emb"
"""The name transformers' attention modules give their rotary function in `_kernel_funcs`."""


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: transformers' Llama apply_rotary_pos_emb, op by op."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _dense_like(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (made contiguous where it is not dense, or its last dim is strided) and an output with its strides."""
    out = torch.empty_like(x)
    if out.stride() != x.stride() or x.stride(-1) != 1:  # a slice of a wider projection, say
        x = x.contiguous()
        out = torch.empty_like(x)
    return x, out


def _rotary_backward_ref(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The backward formula op by op (differentiable): g cos - rotate_half(g sin); the kernel's values."""
    return g * cos.unsqueeze(1) - rotate_half(g * sin.unsqueeze(1))


class _Rotary(torch.autograd.Function):
    """rotary_ref(q, k, cos, sin) with one kernel launch forward and one backward (apply_rotary
    checked that a kernel takes these tensors); a backward that must itself be differentiated
    (create_graph) runs the formula op by op."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        (q, q_out), (k, k_out) = _dense_like(q), _dense_like(k)
        if not kernels.rotary(q, k, cos, sin, q_out, k_out):
            raise RuntimeError(f"rotary kernel refused q {tuple(q.shape)} {q.stride()}, "
                               f"k {tuple(k.shape)} {k.stride()}")
        ctx.save_for_backward(cos, sin)
        ctx.set_materialize_grads(False)  # an unused output: its input's gradient stays None, as autograd's would
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq: torch.Tensor | None, dk: torch.Tensor | None):
        cos, sin = ctx.saved_tensors
        if torch.is_grad_enabled() or dq is None or dk is None:  # double backward, or one output unused
            return (None if dq is None else _rotary_backward_ref(dq, cos, sin),
                    None if dk is None else _rotary_backward_ref(dk, cos, sin), None, None)
        (dq, gq), (dk, gk) = _dense_like(dq), _dense_like(dk)
        if not kernels.rotary(dq, dk, cos, sin, gq, gk, backward=True):
            raise RuntimeError(f"rotary kernel refused gradients {tuple(dq.shape)} {dq.stride()}, "
                               f"{tuple(dk.shape)} {dk.stride()}")
        return gq, gk, None, None


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim): one kernel a direction
    where one takes these tensors (the same values), else the reference."""
    if (unsqueeze_dim != 1 or torch.compiler.is_compiling() or cos.requires_grad or sin.requires_grad
            or not kernels.rotary_takes(q, k, cos, sin)):
        return rotary_ref(q, k, cos, sin, unsqueeze_dim)
    return _Rotary.apply(q, k, cos, sin)


def _code(f) -> tuple | None:
    c = getattr(f, "__code__", None)
    return None if c is None else (c.co_code, c.co_consts, c.co_names)


def _original(hook: nn.Module):
    """The plain function behind transformers' kernel-hub wrapper `hook` (kernels' Func module)."""
    cells = getattr(type(hook).forward, "__closure__", None) or ()
    funcs = [c.cell_contents for c in cells if isinstance(c.cell_contents, types.FunctionType)]
    return funcs[0] if len(funcs) == 1 else None


def _llama_form(module: nn.Module) -> bool:
    """True when `module`'s rotary is, op for op, Llama's apply_rotary_pos_emb and rotate_half."""
    from transformers.models.llama import modeling_llama as llama

    hook = module.__dict__.get("_kernel_funcs", {}).get(HOOK)
    if not isinstance(hook, nn.Module) or not isinstance(llama.apply_rotary_pos_emb, nn.Module):
        return False  # no kernel hook here (transformers 4, or without the kernels package)
    mine, ref = _original(hook), _original(llama.apply_rotary_pos_emb)
    if mine is None or ref is None or _code(mine) != _code(ref):
        return False
    return _code(mine.__globals__.get("rotate_half")) == _code(llama.rotate_half)  # the one it calls


def _fused_forward(self: nn.Module, q, k, cos, sin, unsqueeze_dim: int = 1, **kwargs):
    if kwargs:  # a transformers that passes more than Llama's arguments: its own function
        return type(self).forward(self, q, k, cos, sin, unsqueeze_dim, **kwargs)
    return apply_rotary(q, k, cos, sin, unsqueeze_dim)


def use_fused_rotary(model: nn.Module) -> int:
    """Route each attention module of `model` whose rotary is Llama's through apply_rotary (the
    module's own hook; nothing global changes). Returns how many modules now use it."""
    n = 0
    for module in model.modules():
        if not _llama_form(module):
            continue
        hook = module._kernel_funcs[HOOK]
        mine = getattr(hook.__dict__.get("forward"), "__func__", None)
        if mine is None:  # transformers' own (kernels.kernelize may have set another: left as it is)
            hook.forward = types.MethodType(_fused_forward, hook)
        n += mine is None or mine is _fused_forward
    return n
