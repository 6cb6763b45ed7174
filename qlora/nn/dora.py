"""DoRA on the 4-bit base (QDoRA): weight-decomposed LoRA, a trained magnitude per output.

    layer = qlora.DoraLinear(qlora.Linear4bit.from_linear(linear), r=16, alpha=32)
    y = layer(x)     # (m / ||W + s B A||_row) * (x W^T + s x A^T B^T) + b

- The direction is W + s B A (W the dequantized 4-bit weight, s the LoRA scaling); the
  magnitude `lora_magnitude_vector` m [out] (trained, the adapters' dtype) starts at the row
  norms of W + s B A, which are those of W since B starts at zero: a fresh layer computes its
  base. Keys and values are PEFT's DoRA (`use_dora=True`): PEFT's "weight norm" is the norm of
  each output's row of W + s B A, detached from the gradient (DoRA paper, section 4.3).
- The row norms never hold a dequantized copy of W: the 4-bit weight is decoded (in its
  original dtype, as bitsandbytes' dequantize gives it to PEFT) a few rows at a time (`row_norms`, about 4 MiB of float32 a chunk), s B A added to those rows, their
  norms taken. They are cached until A or B changes (their in-place version counters: an
  optimizer step, a load), so gradient checkpointing's recompute and evaluation reuse them.
- Forward: the LoRA output z = x W^T + s B A dropout(x) (LoraLinear's path), then the rows
  scaled by g = m / norm: y = g (z - b) + b. Autograd keeps z (for m's gradient) beside the
  LoRA's saves. Without dropout this is PEFT's output exactly; with dropout PEFT scales a
  second base product of the dropped input, x_d W^T, which this layer does not compute (one
  4-bit GEMM fewer per layer); saved adapters, evaluation and merging are unaffected.
- `merged_layer()` folds it into a dense layer: g[:, None] * (W + s B A), bias unchanged.
Tests: tests/nn/test_dora.py (against peft's DoRA on a bitsandbytes base).
"""
from __future__ import annotations

import torch
from torch import nn

from .linear4bit import Linear4bit, is_conv1d
from .lora import LoraLinear
from ..quant.tensor import QuantizedTensor

CHUNK_ELEMENTS = 1 << 20
"""Weight elements decoded at a time by row_norms (4 MiB of float32)."""


def _rows_4bit(qt: QuantizedTensor, scales: torch.Tensor, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [start, end) of the 4-bit weight `qt` [end - start, in], decoded in `dtype` and
    widened to float32, from the whole blocks that hold them (`scales`: qt.scales(), every
    block's float32 scale)."""
    cols, bs = qt.shape[1], qt.blocksize
    e0, e1 = start * cols, end * cols
    b0, b1 = e0 // bs, -(-e1 // bs)
    n = min(b1 * bs, qt.numel()) - b0 * bs
    piece = QuantizedTensor(qt.data[b0 * bs // 2: b0 * bs // 2 + (n + 1) // 2], scales[b0:b1].contiguous(),
                            torch.Size([n]), torch.float32, qt.quant_type, bs, qt.code)
    return piece.dequantize(dtype)[e0 - b0 * bs: e1 - b0 * bs].view(end - start, cols).float()


def base_rows(base: nn.Module, original_dtype: bool = False):
    """A function (start, end) -> float32 rows [start:end] of the base weight [out, in]; a 4-bit
    weight decoded in float32, or in its original dtype with `original_dtype` (as bitsandbytes'
    dequantize gives it to PEFT's DoRA norm)."""
    if isinstance(base, Linear4bit):
        qt = base.weight
        scales, dtype = qt.scales(), qt.dtype if original_dtype else torch.float32
        return lambda s, e: _rows_4bit(qt, scales, s, e, dtype)
    w = base.weight.detach()
    if is_conv1d(base):  # Conv1D stores [in, out]
        return lambda s, e: w[:, s:e].t().float()
    return lambda s, e: w[s:e].float()


@torch.no_grad()
def row_norms(base: nn.Module, a: torch.Tensor, b: torch.Tensor, scaling: float,
              chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """||W_i + scaling (B A)_i|| for every output i, float32 [out]: W decoded a chunk of rows at
    a time, never whole; a 4-bit W in its original dtype, as PEFT's DoRA reads it."""
    rows = base_rows(base, original_dtype=True)
    out, cols = b.shape[0], a.shape[1]
    step = max(1, chunk_elements // cols)
    a, b = a.detach().float(), b.detach().float()
    norms = torch.empty(out, dtype=torch.float32, device=a.device)
    for s in range(0, out, step):
        e = min(s + step, out)
        w = rows(s, e).to(a.device)
        norms[s:e] = torch.linalg.vector_norm(torch.addmm(w, b[s:e], a, alpha=scaling), dim=1)
    return norms


class DoraLinear(LoraLinear):
    """LoraLinear with a trained magnitude per output; see the module docstring."""

    def reset_lora_parameters(self) -> None:
        super().reset_lora_parameters()
        self._norm_key = None
        magnitude = self.weight_norm().to(self.lora_A.weight.dtype)
        self.lora_magnitude_vector = nn.Parameter(magnitude, requires_grad=self.lora_A.weight.requires_grad)

    def _unmerged(self) -> nn.Module:
        return self._base4bit() or self.base_layer

    def weight_norm(self) -> torch.Tensor:
        """The detached row norms ||W + s B A||, float32 [out], cached while A and B are unchanged."""
        a, b = self.lora_A.weight, self.lora_B.weight
        key = (a._version, b._version, a.data_ptr(), b.data_ptr(), self.scaling, id(self._unmerged()))
        if getattr(self, "_norm_key", None) != key:
            self._norm = row_norms(self._unmerged(), a, b, self.scaling)
            self._norm_key = key
        return self._norm

    def magnitude_scale(self) -> torch.Tensor:
        """g = m / ||W + s B A||, float32 [out] (the gradient reaches m, not the norm)."""
        return self.lora_magnitude_vector.float() / self.weight_norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return super().forward(x)
        p = self.lora_dropout.p if self.training and isinstance(self.lora_dropout, nn.Dropout) else 0.0
        z = self._add_update(x, self.base_layer(x), p)
        g = self.magnitude_scale().to(z.dtype)
        bias = self.base_layer.bias
        if bias is None:
            return z * g
        bias = bias.to(z.dtype)
        return torch.addcmul(bias, z - bias, g)

    # ---- merging ---------------------------------------------------------------------------
    def merged_layer(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A new dense nn.Linear holding g[:, None] * (W + s B A) (16-bit by default); self is unchanged."""
        base = self._unmerged()
        rows = base_rows(base)
        weight = rows(0, self.out_features)
        weight.add_(self.delta_weight().to(weight.device)).mul_(self.magnitude_scale().detach()[:, None])
        if dtype is None:
            dtype = base.weight.dtype
            dtype = torch.bfloat16 if isinstance(base, Linear4bit) and dtype == torch.float32 else dtype
        dense = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device="meta")
        dense.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if base.bias is not None:
            dense.bias = nn.Parameter(base.bias.detach().to(dtype, copy=True), requires_grad=False)
        return dense

    def merge(self) -> None:
        """Replace the base by merged_layer() in the compute dtype (the base kept aside: unmerge() is exact)."""
        if self.merged:
            return
        base = self.base_layer
        self.base_layer = self.merged_layer(self.compute_dtype)
        self.__dict__["_unmerged_base"] = base
        self.merged = True

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora"

