"""Linear4bit: a frozen 4-bit linear layer that decodes its weight on the fly.

    layer = qlora.Linear4bit.from_linear(nn.Linear(4096, 4096), quant_type="nf4")
    y = layer(x)                    # x @ dequant(W).T + b, computed in bf16, y in x.dtype
    dense = layer.dequantize()      # back to an nn.Linear

Design:
- Only the packed weight is resident (a QuantizedTensor: 4-bit codes + block scales, held
  as buffers so `.to()`, `state_dict()` and FSDP see them). `weight` is that
  QuantizedTensor; `state_dict()` writes bitsandbytes' keys (formats.md section 4).
- Every call decodes into one shared workspace per (device, dtype), sized to the largest
  layer seen, instead of a fresh 32 MiB tensor (a fresh allocation costs 3x the decode in
  page faults). The decoded copy is consumed by a matmul at once, so layers, gradient
  checkpointing's recomputation and backward can all share it.
- `_DequantLinear` is the autograd Function: it saves the packed weight, never the decoded
  one, and backward decodes again. The weight never gets a gradient.
- Note: slow 16-bit GEMM. On CPUs without AVX512-BF16 / AMX, torch has no oneDNN path for
  bf16/fp16 matmuls and its fallback runs grad_y @ W (row-major W: "NN") about 40x slower
  than x @ W.T ("NT"): 11.5 s vs 0.3 s for [64, 4096] x [4096, 4096] on an AVX2 core.
  There, backward copies the decoded W transposed into a second workspace (50 ms at 4096^2)
  and multiplies in the NT form. Elsewhere (GPUs, AMX CPUs) it multiplies W directly.
- Flat mode, for FSDP2 (`to_flat_parameters()`): the packed codes, the block scales and the
  nested scales become frozen 1-D uint8 Parameters (`weight_packed`, `weight_absmax`,
  `weight_nested_absmax`; float32 scales are stored as their bytes). FSDP2 shards
  Parameters on dim 0 (torch.chunk, the last ranks padded or empty), so any world size and
  any element count shard and gather exactly, and mixed precision never casts a scale
  (it only casts floating-point parameters). `weight` rebuilds the QuantizedTensor from the
  gathered (unsharded) parameters at every forward; the code books stay replicated buffers.
Tests: tests/nn/test_linear4bit.py; flat mode: tests/model/test_shard.py.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..quant.tensor import QuantizedTensor, quantize

# ---- the shared decode workspace ---------------------------------------------------------
_WORKSPACES: dict[tuple, torch.Tensor] = {}
_VIEWS: dict[tuple, torch.Tensor] = {}  # (shape, dtype, device, tag) -> its view of the buffer: made once


def workspace(shape: torch.Size, dtype: torch.dtype, device: torch.device, tag: str = "") -> torch.Tensor:
    """A contiguous `shape` view of the shared (device, dtype, tag) buffer, grown on demand.

    Its contents are valid only until the next call: decode into it, then consume it.
    Not for concurrent use from several threads on one device.
    """
    view = _VIEWS.get((shape, dtype, device, tag))
    if view is not None:
        return view
    numel = math.prod(shape)
    key = (torch.device(device), dtype) + ((tag,) if tag else ())
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < numel:
        _WORKSPACES.pop(key, None)  # free the smaller buffer before allocating the larger
        _VIEWS.clear()  # (their views hold it too)
        buf = _WORKSPACES[key] = torch.empty(numel, dtype=dtype, device=device)
    view = _VIEWS[shape, dtype, device, tag] = buf[:numel].view(shape)
    return view


def workspace_bytes() -> int:
    """Bytes held by all decode workspaces (one buffer per device, dtype and layout)."""
    return sum(b.numel() * b.element_size() for b in _WORKSPACES.values())


def clear_workspaces() -> None:
    """Free the decode workspaces (they are re-created on the next forward)."""
    _WORKSPACES.clear()
    _VIEWS.clear()


def decode(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """W decoded into the shared workspace (valid until the next decode)."""
    out = workspace(qt.shape, dtype, qt.device)
    return out if kernels.decode_4bit(qt, out) else qt.dequantize(out=out)


def decode_for_backward(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """W decoded into the workspace for grad_x = grad_y @ W; on CPUs with the slow 16-bit GEMM,
    a transposed copy (the same W, laid out for the fast "NT" product; see the module docstring)."""
    w = decode(qt, dtype)
    if transposed_backward(w.device, w.dtype):
        w_t = workspace(w.shape[::-1], w.dtype, w.device, tag="transposed")
        w = w_t.copy_(w.t()).t()
    return w


_SLOW_NN: dict[torch.dtype, bool] = {}


def transposed_backward(device: torch.device, dtype: torch.dtype) -> bool:
    """True where backward multiplies by a transposed copy of W (see "slow 16-bit GEMM")."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    if dtype not in _SLOW_NN:
        try:
            fast = (torch.ops.mkldnn._is_mkldnn_bf16_supported() if dtype == torch.bfloat16
                    else torch.ops.mkldnn._is_mkldnn_fp16_supported())
        except (AttributeError, RuntimeError):
            fast = True
        _SLOW_NN[dtype] = not fast
    return _SLOW_NN[dtype]


# ---- the autograd Function -------------------------------------------------------------------
class _DequantLinear(torch.autograd.Function):
    """y = x @ W.T + b with W = dequant(qt), all in `compute_dtype`; y is cast to x.dtype.

    Gradients: grad_x = grad_y @ W (W decoded again in backward; on CPUs with the slow
    16-bit GEMM, through a transposed copy, see the module docstring), grad_b = sum of grad_y
    over the leading dimensions (only if the bias requires grad). W gets none.
    Saved for backward: the QuantizedTensor (packed codes + scales, a reference, no copy)
    and the dtypes; not x, not the decoded W, not y.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        ctx.qt, ctx.compute_dtype, ctx.x_dtype = qt, compute_dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        w = decode(qt, compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        return F.linear(x.to(compute_dtype), w, b).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y.to(ctx.compute_dtype).matmul(decode_for_backward(ctx.qt, ctx.compute_dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_b, None


# ---- the module ------------------------------------------------------------------------------
_QUANT_BUFFERS = ("_packed", "_absmax", "_code", "_nested_absmax", "_nested_code")
FLAT_PARAMETERS = ("weight_packed", "weight_absmax", "weight_nested_absmax")
"""Flat mode's frozen uint8 Parameters: packed codes, block scales, nested scales (bytes)."""


def flat_bytes(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """The flat uint8 views (no copy) that flat mode stores: {FLAT_PARAMETERS name: bytes}."""
    parts = {"weight_packed": qt.data, "weight_absmax": qt.absmax}
    if qt.double_quant:
        parts["weight_nested_absmax"] = qt.nested_absmax
    return {k: t.contiguous().reshape(-1).view(torch.uint8) for k, t in parts.items()}


def _view_as(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    if isinstance(t, nn.Parameter):
        t = t.detach()
    if type(t) is not torch.Tensor and type(t) is not nn.Parameter:  # a DTensor shard, outside forward
        raise RuntimeError(f"Linear4bit.{name} is sharded ({type(t).__name__}): read the weight inside forward, "
                           "or gather the module's parameters first (FSDP2: module.unshard())")
    if dtype == torch.uint8:
        return t
    if t.storage_offset() * t.element_size() % torch.empty(0, dtype=dtype).element_size():
        t = t.clone()  # a view of bytes at an unaligned offset cannot be reinterpreted in place
    return t.view(dtype)


COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def is_conv1d(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D"  # transformers.pytorch_utils.Conv1D, weight [in, out]


class Linear4bit(nn.Module):
    """A frozen linear layer with a 4-bit weight; see the module docstring.

    `weight` is the QuantizedTensor ([out, in], original dtype in `weight.dtype`);
    `bias` an optional frozen Parameter kept in its own dtype (never cast in place).
    """

    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if not isinstance(weight, QuantizedTensor):
            raise TypeError(f"Linear4bit expects a QuantizedTensor weight, got {type(weight).__name__}")
        if len(weight.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
        if compute_dtype not in COMPUTE_DTYPES:
            raise TypeError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype}")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}; the weight {tuple(weight.shape)} needs ({self.out_features},)")
        self.compute_dtype = compute_dtype
        self._set_weight(weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_linear(cls, layer: nn.Module, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.bfloat16) -> "Linear4bit":
        """Quantize an nn.Linear, or a transformers Conv1D (its [in, out] weight is transposed)."""
        if not (isinstance(layer, nn.Linear) or is_conv1d(layer)):
            raise TypeError(f"Linear4bit.from_linear expects nn.Linear or transformers Conv1D, got {type(layer).__name__}")
        weight = layer.weight.detach()
        if weight.device.type == "meta":
            raise ValueError(f"{type(layer).__name__} weight {tuple(weight.shape)} is on the meta device; load it first")
        if is_conv1d(layer):
            weight = weight.t()
        new = cls(quantize(weight, quant_type, blocksize, double_quant), layer.bias, compute_dtype)
        new.fan_in_fan_out = is_conv1d(layer)
        return new

    @classmethod
    def from_quantized(cls, weight: QuantizedTensor, bias: torch.Tensor | None = None,
                       compute_dtype: torch.dtype = torch.bfloat16) -> "Linear4bit":
        """Wrap an existing QuantizedTensor (e.g. read from a bitsandbytes checkpoint)."""
        return cls(weight, bias, compute_dtype)

    fan_in_fan_out = False
    """True when built from a Conv1D (informational: the stored weight is always [out, in])."""

    def _set_weight(self, qt: QuantizedTensor) -> None:
        self.__dict__.pop("_qt", None)  # `weight`'s cached QuantizedTensor: it holds the old buffers
        self._meta = dict(shape=torch.Size(qt.shape), dtype=qt.dtype, quant_type=qt.quant_type,
                          blocksize=qt.blocksize, nested_offset=qt.nested_offset)
        self._sync_offset()
        for name, t in zip(_QUANT_BUFFERS, (qt.data, qt.absmax, qt.code, qt.nested_absmax, qt.nested_code)):
            self.register_buffer(name, t, persistent=False)  # saved by _save_to_state_dict instead

    @property
    def weight(self) -> QuantizedTensor:
        """The packed weight as a QuantizedTensor over this module's (current) buffers or flat parameters.
        While torch.compile traces, without its nested_offset float (a constant guarded per layer):
        the compiled path decodes with `nested_offset_tensor` (nn/ops.py)."""
        m = self._meta
        if torch.compiler.is_compiling():
            return self._make_weight(None)
        if self.flat:  # FSDP2 swaps the parameters between calls: nothing to keep
            return self._make_weight(m["nested_offset"])
        # eager: the QuantizedTensor made last, while the same buffers and metadata hold (the hot path)
        key = (*map(id, map(self._buffers.get, _QUANT_BUFFERS)), m["nested_offset"], m["dtype"])
        cached = self.__dict__.get("_qt")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_qt"] = (key, self._make_weight(m["nested_offset"]))
        return cached[1]

    def _make_weight(self, offset: float | None) -> QuantizedTensor:
        m = self._meta
        if self.flat:
            packed = _view_as(self.weight_packed, torch.uint8, "weight_packed").view(-1, 1)
            absmax = _view_as(self.weight_absmax, m["absmax_dtype"], "weight_absmax")
            nested = self._parameters.get("weight_nested_absmax")
            nested = None if nested is None else _view_as(nested, torch.float32, "weight_nested_absmax")
            return QuantizedTensor(packed, absmax, m["shape"], m["dtype"], m["quant_type"], m["blocksize"],
                                   self._code, nested, self._nested_code, offset)
        return QuantizedTensor(self._packed, self._absmax, m["shape"], m["dtype"], m["quant_type"], m["blocksize"],
                               self._code, self._nested_absmax, self._nested_code, offset)

    @property
    def flat(self) -> bool:
        """True in flat mode (quantization state held as flat uint8 Parameters, for FSDP2)."""
        return "weight_packed" in self._parameters

    def to_flat_parameters(self) -> "Linear4bit":
        """Switch to flat mode (see the module docstring), in place; works on meta tensors too.

        The parameters are byte views of the current buffers (no copy)."""
        if self.flat:
            return self
        qt = self.weight
        self.__dict__.pop("_qt", None)  # flat mode keeps none: the full buffers must not outlive the sharding
        self._meta["absmax_dtype"] = qt.absmax.dtype
        for name, t in flat_bytes(qt).items():
            self.register_parameter(name, nn.Parameter(t, requires_grad=False))
        for name in ("_packed", "_absmax", "_nested_absmax"):
            del self._buffers[name]
        return self

    def set_tensor_meta(self, qt: QuantizedTensor) -> None:
        """Take qt's per-tensor metadata (original dtype, double-quantization offset); flat-mode
        loading (qlora/model/shard.py) copies the bytes of this rank's shard separately."""
        if tuple(qt.shape) != tuple(self._meta["shape"]) or qt.quant_type != self.quant_type \
                or qt.blocksize != self.blocksize or qt.double_quant != self.double_quant:
            raise ValueError(f"set_tensor_meta: {qt} does not match this layer's layout {self.extra_repr()}")
        self._meta.update(dtype=qt.dtype, nested_offset=qt.nested_offset)
        self._sync_offset()

    def _sync_offset(self) -> None:
        # the double quantization's offset (0 without it) also as a 0-dim CPU tensor: torch.compile
        # reads it as a graph input, where the float would be a constant guarded per layer
        self.__dict__["nested_offset_tensor"] = torch.tensor(float(self._meta["nested_offset"] or 0.0))

    @property
    def quant_type(self) -> str:
        return self._meta["quant_type"]

    @property
    def blocksize(self) -> int:
        return self._meta["blocksize"]

    @property
    def double_quant(self) -> bool:
        return self._buffers.get("_nested_absmax", self._parameters.get("weight_nested_absmax")) is not None

    # ---- compute ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear4bit({self.in_features} -> {self.out_features}) got input of shape {tuple(x.shape)}")
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):  # the compute dtype is explicit here
                return _DequantLinear.apply(x, self.weight, self.bias, self.compute_dtype)
        return _DequantLinear.apply(x, self.weight, self.bias, self.compute_dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A dense nn.Linear with the decoded weight (default: the original dtype)."""
        dtype = dtype or self.weight.dtype
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        dense.weight = nn.Parameter(self.weight.dequantize(dtype), requires_grad=False)
        if self.bias is not None:
            dense.bias = nn.Parameter(self.bias.detach().to(dtype, copy=True), requires_grad=False)
        return dense

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.quant_type}, blocksize={self.blocksize}{dq}, compute_dtype={self.compute_dtype}")

    # ---- movement: device moves apply, dtype casts do not touch the quantization state -----------
    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_qt", None)  # let the buffers before the move go
        quant = {name: self._buffers.pop(name) for name in _QUANT_BUFFERS if name in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in quant.items():
                if t is not None:
                    moved = fn(t)
                    t = moved if moved.dtype == t.dtype else t.to(moved.device)
                self._buffers[name] = t
        return self

    # ---- state dict in bitsandbytes' layout ----------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        flat = {name: self._parameters.pop(name) for name in FLAT_PARAMETERS if name in self._parameters}
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            self._parameters.update(flat)
        for key, t in self.weight.state_dict(prefix + "weight").items():
            destination[key] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        wkey = prefix + "weight"
        if self.flat:
            error_msgs.append(f"{wkey}: this Linear4bit is in flat mode (sharded by FSDP2); load the checkpoint "
                              "before calling to_flat_parameters()")
            return
        mine = {k: v for k, v in state_dict.items() if k == wkey or k.startswith(wkey + ".")}
        rest = {k: v for k, v in state_dict.items() if k not in mine}
        if mine:
            try:
                qt = QuantizedTensor.from_state_dict(mine, wkey)
            except ValueError as e:
                error_msgs.append(str(e))
            else:
                if tuple(qt.shape) != (self.out_features, self.in_features):
                    error_msgs.append(f"{wkey}: checkpoint weight has shape {tuple(qt.shape)}, this Linear4bit "
                                      f"needs ({self.out_features}, {self.in_features})")
                else:
                    self._set_weight(qt.to(self._packed.device))
        elif strict:
            missing_keys.append(wkey)
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear4bit, an nn.Linear or a transformers Conv1D (weight [in, out])."""
    if isinstance(layer, (Linear4bit, nn.Linear)):
        return layer.in_features, layer.out_features
    if is_conv1d(layer):
        return tuple(layer.weight.shape)
    raise TypeError(f"a LoRA or 4-bit layer wraps a Linear4bit, nn.Linear or transformers Conv1D, got {type(layer).__name__}")
