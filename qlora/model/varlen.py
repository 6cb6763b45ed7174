"""Packed rows through torch's varlen attention: `--attn-implementation varlen`.

    register()                                   # once: transformers learns the name "varlen"
    model.set_attn_implementation("varlen")      # what set_attention (attention.py) does
    cu, longest = cu_seq_lens(position_ids)      # on the host (train/distributed.py: share)

torch's `varlen_attn` (torch.nn.attention.varlen, CUDA, flash kernels, no flash-attn package)
takes the batch as one run of tokens [tokens, heads, dim] with the documents' boundaries in
`cu_seq_lens` (int32 [documents + 1]): no mask, and no work across documents. Where SDPA
with the block-diagonal mask (the default, model/packing.py) computes every query-key pair
of a row and masks most of them out, this computes the pairs inside documents only.

The batch's boundaries come from the host (`cu_seq_lens`: packed rows split at each document,
padded or full rows one sequence each; right padding, so a row's tokens never see its pad),
and `model_inputs` passes them to the model with a placeholder 4-D mask, which tells
transformers the mask is made: nothing read back from the device, no mask built. A call
without them (eval batches, generation with a cache, a left-padded batch) runs SDPA with the
mask qlora prebuilds or transformers builds (the name is registered with its SDPA mask), so
the model stays right for every caller. Only the causal architectures of PACKED_MODEL_TYPES
take the flag (attention.py), and arguments the kernel has no form for (softcap, sinks,
attention dropout) are refused, never dropped.

torch has no varlen kernel for the CPU. There `varlen_cpu` runs SDPA's CPU flash kernels once
per document (`_VarlenCPU`, causal; sliding windows through the reference).
`varlen_reference` (SDPA with each document's mask) stays the oracle: the tests hold the CPU
kernel and the whole path to it and to the documents run one by one (tests/model/test_varlen.py).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

NAME = "varlen"
_PLACEHOLDERS: dict[torch.device, torch.Tensor] = {}


def placeholder_mask(device: torch.device) -> torch.Tensor:
    """The 4-D mask model_inputs passes with cu_seq_lens (transformers takes a 4-D mask as made,
    and builds none): one per device, never read; the fallback refuses it."""
    device = torch.device(device)
    if device not in _PLACEHOLDERS:
        _PLACEHOLDERS[device] = torch.zeros((1, 1, 1, 1), dtype=torch.bool, device=device)
    return _PLACEHOLDERS[device]


UNSUPPORTED = ("softcap", "s_aux", "position_bias", "head_mask")
"""Attention arguments some architectures pass that the varlen kernel has no form for."""


def cu_seq_lens(position_ids: torch.Tensor | None, shape: tuple[int, int] | None = None
                ) -> tuple[torch.Tensor, int]:
    """(int32 [sequences + 1] cumulative boundaries, the longest sequence) of a [b, t] batch on
    the host: packed rows (`position_ids`) split where a position does not follow the one
    before; without position ids (`shape` = (b, t)) every row is one sequence."""
    if position_ids is None:
        b, t = shape
        return torch.arange(0, b * t + 1, t, dtype=torch.int32), t
    flat = position_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1] + 1
    starts[::position_ids.shape[-1]] = True  # every row starts a sequence
    bounds = torch.cat([starts.nonzero().reshape(-1), torch.tensor([flat.numel()])])
    return bounds.to(torch.int32), int(bounds.diff().max())


def varlen_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_q: torch.Tensor,
                     cu_seq_k: torch.Tensor, max_q: int, max_k: int, *, scale: float | None = None,
                     window_size: tuple[int, int] = (-1, -1), enable_gqa: bool = False) -> torch.Tensor:
    """torch's varlen_attn in plain SDPA, one call per sequence (query [tokens, heads, dim]);
    window_size (left, right) as there: (-1, 0) is causal, (W, 0) causal within W back."""
    bounds = cu_seq_q.tolist()
    if cu_seq_k.tolist() != bounds:
        raise ValueError("varlen_reference: only cu_seq_k == cu_seq_q (self-attention)")
    left, right = window_size
    out = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        i = torch.arange(e - s, device=query.device)
        back = i[:, None] - i[None, :]
        keep = torch.ones_like(back, dtype=torch.bool)
        if left >= 0:
            keep &= back <= left
        if right >= 0:
            keep &= -back <= right
        q, k, v = (t[s:e].transpose(0, 1) for t in (query, key, value))
        out.append(F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale,
                                                  enable_gqa=enable_gqa).transpose(0, 1))
    return torch.cat(out)


_TAKES: dict = {}
"""varlen_attn -> the argument names it takes: read once, before any torch.compile trace (register)."""


def _takes(function) -> frozenset[str]:
    if function not in _TAKES:
        _TAKES[function] = frozenset(inspect.signature(function).parameters)
    return _TAKES[function]


def torch_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_q: torch.Tensor,
                 cu_seq_k: torch.Tensor, max_q: int, max_k: int, *, scale: float | None = None,
                 window_size: tuple[int, int] = (-1, -1), enable_gqa: bool = False) -> torch.Tensor:
    """torch's varlen_attn with the arguments of torch 2.13's, on the torch there is: older ones
    (2.10) take `is_causal` for the window (-1, 0) and may lack `scale` or `enable_gqa`."""
    from torch.nn.attention.varlen import varlen_attn

    takes = _takes(varlen_attn)
    kwargs: dict = {}
    if "window_size" in takes:
        kwargs["window_size"] = window_size
    elif window_size == (-1, 0):
        kwargs["is_causal"] = True
    else:
        raise ValueError(f"--attn-implementation varlen: this torch ({torch.__version__}) has no sliding-window "
                         "varlen attention; use sdpa")
    if enable_gqa and "enable_gqa" not in takes:  # the kv heads repeated, as SDPA's enable_gqa reads them
        key, value = (t.repeat_interleave(query.shape[1] // key.shape[1], dim=1) for t in (key, value))
    elif enable_gqa:
        kwargs["enable_gqa"] = True
    if "scale" in takes:
        kwargs["scale"] = scale
    elif scale is not None:
        query = query * (scale * query.shape[-1] ** 0.5)
    return varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kwargs)


_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _sequence(t: torch.Tensor, s: int, e: int) -> torch.Tensor:
    """Tokens s:e of a [tokens, heads, dim] run as the [1, heads, e - s, dim] view SDPA's kernels take."""
    return t[s:e].unsqueeze(0).transpose(1, 2)


class _VarlenCPU(torch.autograd.Function):
    """Causal attention within each sequence of `bounds`: torch's CPU flash kernels (SDPA's, GQA
    native) once per sequence, forward and backward; the [tokens, heads, dim] layout of varlen_attn.
    Saves: query, key and value as given (GQA's unrepeated), the output and the logsumexp
    [tokens, heads] (float32): what torch's varlen op saves on CUDA, less its RNG state."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int],
                scale: float | None) -> torch.Tensor:
        out = query.new_empty(query.shape[:2] + value.shape[-1:])
        lse = query.new_empty(query.shape[:2], dtype=torch.float32)
        for s, e in zip(bounds[:-1], bounds[1:]):
            o, l = _FLASH(_sequence(query, s, e), _sequence(key, s, e), _sequence(value, s, e), 0.0, True,
                          scale=scale)
            out[s:e], lse[s:e] = o[0].transpose(0, 1), l[0].t()
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.bounds, ctx.scale = bounds, scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        query, key, value, out, lse = ctx.saved_tensors
        grads = [torch.empty_like(t) for t in (query, key, value)]
        for s, e in zip(ctx.bounds[:-1], ctx.bounds[1:]):
            got = _FLASH_BACKWARD(*(_sequence(t, s, e) for t in (grad_out, query, key, value, out)),
                                  lse[s:e].t().unsqueeze(0), 0.0, True, scale=ctx.scale)
            for g, d in zip(grads, got):
                g[s:e] = d[0].transpose(0, 1)
        return *grads, None, None


def varlen_cpu(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_q: torch.Tensor,
               cu_seq_k: torch.Tensor, max_q: int, max_k: int, *, scale: float | None = None,
               window_size: tuple[int, int] = (-1, -1), enable_gqa: bool = False) -> torch.Tensor:
    """varlen_attn on the CPU: causal attention (window (-1, 0)) through torch's CPU flash kernels
    once per sequence (`_VarlenCPU`); other windows, and tensors that are not plain (fake, under
    torch.compile), through the reference."""
    plain = type(query) is torch.Tensor and not torch.compiler.is_compiling()
    if window_size != (-1, 0) or not plain or cu_seq_k is not cu_seq_q:
        return varlen_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                                window_size=window_size, enable_gqa=enable_gqa)
    return _VarlenCPU.apply(query, key, value, cu_seq_q.tolist(), scale)


def _kernel(query: torch.Tensor):
    """torch's varlen_attn for CUDA tensors, `varlen_cpu` for CPU ones, the reference elsewhere."""
    return torch_varlen if query.is_cuda else varlen_cpu if query.device.type == "cpu" else varlen_reference


def varlen_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface (query [b, heads, t, dim], key and value [b, kv heads,
    t, dim]; returns [b, t, heads, dim]): varlen over `cu_seq_lens_q` where the call carries
    it, else transformers' SDPA with the mask it was given."""
    cu = kwargs.pop("cu_seq_lens_q", None)
    longest = kwargs.pop("max_length_q", None)
    for k in ("cu_seq_lens_k", "max_length_k"):
        kwargs.pop(k, None)
    if cu is None:
        if attention_mask is not None and attention_mask is _PLACEHOLDERS.get(attention_mask.device):
            raise RuntimeError(f"varlen attention: {type(module).__name__} got the placeholder mask without the "
                               "batch's boundaries (its model does not pass the attention kwargs on); use sdpa")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    if unsupported := [k for k in UNSUPPORTED if kwargs.get(k) is not None]:
        raise ValueError(f"--attn-implementation varlen: {type(module).__name__} passes {', '.join(unsupported)}, "
                         "which torch's varlen attention has no form for; use sdpa")
    if kwargs.get("is_causal") is False or not getattr(module, "is_causal", True):
        raise ValueError(f"--attn-implementation varlen: {type(module).__name__} is not causal; use sdpa")
    if dropout:
        raise ValueError(f"--attn-implementation varlen: torch's varlen attention has no dropout, and this "
                         f"model's attention dropout is {dropout}; set it to 0 in its config, or use sdpa")
    if query.is_cuda and query.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"--attn-implementation varlen runs flash kernels, in bf16 or fp16 only (this model "
                         f"computes in {query.dtype}); use --compute-dtype bfloat16, or sdpa")
    b, heads, t, _ = query.shape
    q, k, v = (x.transpose(1, 2).reshape(b * t, x.shape[1], x.shape[-1]) for x in (query, key, value))
    window = (-1, 0) if sliding_window is None else (sliding_window - 1, 0)
    out = _kernel(q)(q, k, v, cu, cu, longest, longest, scale=scaling, window_size=window,
                     enable_gqa=key.shape[1] != heads)
    return out.view(b, t, heads, out.shape[-1]), None


def uses_varlen(model: nn.Module) -> bool:
    """True when `model` (or the model a DDP wrapper holds) runs varlen attention: its batches
    then need their boundaries (train/distributed.py: share)."""
    config = getattr(getattr(model, "module", model), "config", None)
    return getattr(config, "_attn_implementation", None) == NAME


def register() -> None:
    """Teach transformers the attention name "varlen" (and its SDPA mask, for calls without
    boundaries); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return
    _takes(varlen_attn)
