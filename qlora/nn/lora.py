"""LoRA: a trainable low-rank update beside a frozen linear layer.

    layer = qlora.LoraLinear(qlora.Linear4bit.from_linear(linear), r=16, alpha=32, dropout=0.05)
    y = layer(x)       # base(x) + scaling * B(A(dropout(x))), scaling = alpha / r

- A [r, in] starts kaiming-uniform (a = sqrt(5), bound 1/sqrt(in)), B [out, r] at zero, so
  a fresh adapter changes nothing; a base carrying LoftQ factors (`lora_init`) starts at them. `use_rslora` scales by alpha / sqrt(r) instead.
- Dropout (training only) is seeded by element index (dropout.py), so backward regenerates
  the mask: the branch keeps x, not a dropped copy of it (`_DropoutA`).
- The update is added inside the second GEMM (addmm: base output + s xa B^T, rounded once)
  where the base output is in the compute dtype: one pass over the output.
- The adapters are stored in fp32 by default (`dtype=torch.bfloat16` halves them) and cast
  to the base layer's compute dtype for the two small matmuls, as PEFT does under autocast;
  gradients flow back through the cast to the fp32 parameters. A and B are views of one
  buffer [A | B], so a call casts both in one launch (`adapters_in`).
- Over a Linear4bit, with x in its compute dtype, forward is one autograd Function
  (lora4bit.py: base and update together, fewer kernel launches; hooks on the base layer's
  forward do not run there); the code here (Linear4bit's Function, _DropoutA, addmm) is the
  oracle it is tested against, and what runs with QLORA_KERNELS=reference, over dense bases
  and for other input dtypes.
- The base may be a Linear4bit (QLoRA) or a frozen nn.Linear / transformers Conv1D
  (16-bit LoRA, the baseline the paper compares with). Submodule names match PEFT's
  (`base_layer`, `lora_A`, `lora_B`), so state-dict keys read like a PEFT model's.
- With QLORA_FUSED_LORA=1 on CUDA, a Linear4bit base takes the fused path (fused_lora.py:
  W decoded inside the GEMM, the LoRA product in its epilogue); this module's code is the
  default and the reference.
- `adapters_disabled(model)`: while open, every LoraLinear computes its base layer alone (the
  reference model of DPO: the same 4-bit base, no second copy).
- `merge()` folds the update into a 16-bit weight: into the dequantized weight for a
  Linear4bit (the 4-bit weight is kept aside, untouched, so `unmerge()` is exact), in place
  for a dense base (`unmerge()` subtracts again, exact up to the weight dtype's rounding).
Tests: tests/nn/test_lora.py.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..errors import InputError
from . import fused_lora
from .dropout import SeedBank, new_seed, seeded_dropout
from .linear4bit import Linear4bit, features, is_conv1d
from .lora4bit import Lora4bitLinear

ADAPTER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LoraConfig:
    """Which layers get adapters and how big they are (defaults: the QLoRA paper's recipe).

    `target_modules`: "all-linear" (every Linear/Conv1D but the output head), a list of
    module names (a name matches a module whose full name equals it or ends with "." + it)
    or a regular expression matched against full module names. `exclude_modules`: names
    (matched the same way as a list) that never get an adapter. `dtype`: the adapters' dtype.
    `use_dora`: DoRA layers (nn/dora.py DoraLinear: a trained magnitude per output).
    """

    r: int = 64
    alpha: float = 16
    dropout: float = 0.05
    target_modules: str | list[str] | tuple[str, ...] = "all-linear"
    use_rslora: bool = False
    dtype: torch.dtype = torch.float32
    exclude_modules: list[str] | tuple[str, ...] = field(default_factory=tuple)
    use_dora: bool = False

    def __post_init__(self):
        _check_hparams(self.r, self.alpha, self.dropout, self.dtype)

    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.use_rslora)


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The factor of the update B A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _check_hparams(r, alpha, dropout, dtype) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise InputError(f"LoRA rank r must be a positive int, got {r!r}")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise InputError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise InputError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if dtype not in ADAPTER_DTYPES:
        raise TypeError(f"LoRA adapter dtype must be one of {ADAPTER_DTYPES}, got {dtype}")


class _DropoutA(torch.autograd.Function):
    """xa = dropout(x) A^T [..., r], the adapter's first product in training, with seeded
    dropout (dropout.py). Gradients, with g = d xa: dA = g^T dropout(x), dx = dropout(g A)
    (the same mask). Saves x (the layer's input itself, not a copy: q, k and v share it), A
    and the seed; dropout(x) is regenerated in backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        ctx.p, ctx.seed = p, seed
        ctx.save_for_backward(x, a)
        return F.linear(seeded_dropout(x, p, seed), a)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, a = ctx.saved_tensors
        grad_x = seeded_dropout(g @ a, ctx.p, ctx.seed) if ctx.needs_input_grad[0] else None
        grad_a = None
        if ctx.needs_input_grad[1]:
            dropped = seeded_dropout(x, ctx.p, ctx.seed).reshape(-1, x.shape[-1])
            grad_a = g.reshape(-1, g.shape[-1]).t() @ dropped
        return grad_x, grad_a, None, None


class LoraLinear(nn.Module):
    """base(x) + scaling * B(A(dropout(x))) over a frozen base layer; see the module docstring."""

    def __init__(self, base_layer: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        _check_hparams(r, alpha, dropout, dtype)
        self.in_features, self.out_features = features(base_layer)
        self.base_layer = base_layer.requires_grad_(False)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        device = _device(base_layer) if device is None else device  # explicit: real adapters over a meta base
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self._side_by_side()
        self.merged = False
        self.reset_lora_parameters()
        self.train(base_layer.training)  # an adapter added to a model in eval mode does not drop out

    def _side_by_side(self) -> None:
        """A and B as views of one buffer [A | B], so that a call casts both in one launch (adapters_in)."""
        a, b = self.lora_A.weight, self.lora_B.weight
        ab = torch.cat([a.detach().reshape(-1), b.detach().reshape(-1)])
        self.lora_A.weight = nn.Parameter(ab[:a.numel()].view(a.shape))
        self.lora_B.weight = nn.Parameter(ab[a.numel():].view(b.shape))

    def adapters_in(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B in `dtype`, detached: one cast of both while they lie side by side in one buffer
        (as __init__ puts them; `.to(device)` or loading with assign=True separates them), else two."""
        a, b = self.lora_A.weight, self.lora_B.weight
        if a.dtype == dtype and b.dtype == dtype:
            return a.detach(), b.detach()
        if torch.compiler.is_compiling():  # two casts in the graph (no storage addresses while tracing)
            return a.detach().to(dtype), b.detach().to(dtype)
        joint = self.__dict__.get("_joint")  # (A, B, their addresses, [A | B] flat or None): checked once per layout
        if joint is None or joint[0] is not a or joint[1] is not b or joint[2] != (a.data_ptr(), b.data_ptr()):
            a_, b_ = a.detach(), b.detach()
            flat = a_.as_strided((a.numel() + b.numel(),), (1,)) if _side_by_side(a_, b_) else None
            joint = self.__dict__["_joint"] = (a, b, (a.data_ptr(), b.data_ptr()), flat)
        if joint[3] is None:
            return a.detach().to(dtype), b.detach().to(dtype)
        ab = joint[3].to(dtype)
        return ab.as_strided(a.shape, a.stride(), 0), ab.as_strided(b.shape, b.stride(), a.numel())

    @property
    def scaling(self) -> float:
        """lora_scaling of this layer's r, alpha and rsLoRA flag (load_adapter may change them)."""
        return lora_scaling(self.r, self.alpha, self.use_rslora)

    def reset_lora_parameters(self) -> None:
        """Kaiming A, zero B; or, where the base carries `lora_init` = (A, B) (LoftQ:
        W ~ base + B A), those factors divided by sqrt(scaling) so that scaling * B A = B A."""
        init = getattr(self.base_layer, "lora_init", None)
        if init is None:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
            return
        A, B = init
        if A.shape != self.lora_A.weight.shape or B.shape != self.lora_B.weight.shape:
            raise ValueError(f"the base layer's LoftQ factors have rank {A.shape[0]}, this adapter r={self.r}: "
                             "use the same rank for both")
        root = math.sqrt(self.scaling)
        with torch.no_grad():
            self.lora_A.weight.copy_(A / root)
            self.lora_B.weight.copy_(B / root)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the adapter matmuls: the base's compute dtype (Linear4bit) or weight dtype."""
        base = self._base4bit() or self.base_layer
        return base.compute_dtype if isinstance(base, Linear4bit) else base.weight.dtype

    disabled = False
    """True inside `adapters_disabled`: forward computes the base layer alone."""
    seed_slot: tuple[SeedBank, int] | None = None
    """(bank, index) from `share_seeds`: the dropout seed comes from the block's bank."""

    def dropout_seed(self, device: torch.device) -> torch.Tensor:
        """A fresh dropout seed on `device`: from the block's SeedBank, else drawn alone (and
        alone while torch.compile traces, where the draw is one op of the layer's graph)."""
        if self.seed_slot is None or torch.compiler.is_compiling():
            return new_seed(device)
        bank, i = self.seed_slot
        return bank.take(i, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return (self._base4bit() or self.base_layer)(x)
        p = self.lora_dropout.p if self.training and isinstance(self.lora_dropout, nn.Dropout) else 0.0
        if not self.merged and fused_lora.usable(self.base_layer, x):  # opt-in on CUDA: one fused GEMM per direction
            return fused_lora.forward(x, self.base_layer, self.lora_A.weight, self.lora_B.weight, self.scaling, p,
                                      self.dropout_seed(x.device) if p > 0 else None)
        base = self.base_layer
        if (not self.merged and isinstance(base, Linear4bit) and x.dtype == base.compute_dtype
                and x.shape[-1] == self.in_features and not kernels.reference_only()):
            return self._one_function(x, base, p)
        out = base(x)
        if self.merged:
            return out
        return self._add_update(x, out, p)

    def _one_function(self, x: torch.Tensor, base: Linear4bit, p: float) -> torch.Tensor:
        """base(x) + scaling * B(A(dropout_p(x))) as one Function (lora4bit.py)."""
        dt = base.compute_dtype
        a16, b16 = self.adapters_in(dt)  # no autograd history: the Function makes A's and B's gradients
        seed = self.dropout_seed(x.device) if p > 0 else None
        args = (x, self.lora_A.weight, self.lora_B.weight, base.weight, base.nested_offset_tensor, base.bias, a16, b16,
                self.scaling, p, seed, dt)
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):  # the compute dtype is explicit here
                return Lora4bitLinear.apply(*args)
        return Lora4bitLinear.apply(*args)

    def _add_update(self, x: torch.Tensor, out: torch.Tensor, p: float) -> torch.Tensor:
        """out + scaling * B(A(dropout_p(x))), the update in the compute dtype."""
        dt = self.compute_dtype
        x, a, b = x.to(dt), self.lora_A.weight.to(dt), self.lora_B.weight.to(dt)
        xa = _DropoutA.apply(x, a, p, self.dropout_seed(x.device)) if p > 0 else F.linear(x, a)
        if out.dtype != dt:
            return torch.add(out, F.linear(xa, b).to(out.dtype), alpha=self.scaling)
        # out + s xa B^T in one GEMM: one pass over the output instead of three (write, read, add)
        y = torch.addmm(out.reshape(-1, self.out_features), xa.reshape(-1, self.r), b.t(), alpha=self.scaling)
        return y.view(out.shape)

    # ---- merging ---------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in float32, shaped [out, in]."""
        return (self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float()) * self.scaling

    def merged_layer(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A new dense nn.Linear holding base + scaling * B @ A (16-bit by default); self is unchanged.

        For a Linear4bit base the update is added to the dequantized weight in float32 and
        rounded once to `dtype` (default: the weight's original dtype, bf16 if that is fp32).
        """
        base = self._base4bit() or self.base_layer
        if isinstance(base, Linear4bit):
            dense = base.dequantize(torch.float32)
            dtype = dtype or (base.weight.dtype if base.weight.dtype != torch.float32 else torch.bfloat16)
        else:
            w = base.weight.detach().float()
            dense = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device="meta")
            dense.weight = nn.Parameter(w.t().contiguous() if is_conv1d(base) else w.clone(), requires_grad=False)
            if base.bias is not None:
                dense.bias = nn.Parameter(base.bias.detach().float(), requires_grad=False)
            dtype = dtype or base.weight.dtype
        if isinstance(base, Linear4bit) or not self.merged:  # a merged dense base already holds it
            dense.weight.add_(self.delta_weight())
        return dense.to(dtype).requires_grad_(False)

    def merge(self) -> None:
        """Fold the update into a 16-bit weight; forward then skips the adapter path."""
        if self.merged:
            return
        if isinstance(self.base_layer, Linear4bit):
            four_bit = self.base_layer
            self.base_layer = self.merged_layer(four_bit.compute_dtype if four_bit.compute_dtype != torch.float32
                                                else None)
            self.__dict__["_unmerged_base"] = four_bit  # kept aside, not a submodule: exact unmerge
        else:
            w = self.base_layer.weight
            delta = self.delta_weight()
            with torch.no_grad():
                w.copy_((w.float() + (delta.t() if is_conv1d(self.base_layer) else delta)).to(w.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Undo `merge()`: exact for a Linear4bit base, up to the weight dtype's rounding otherwise."""
        if not self.merged:
            return
        four_bit = self.__dict__.pop("_unmerged_base", None)
        if four_bit is not None:
            self.base_layer = four_bit
        else:
            w = self.base_layer.weight
            delta = self.delta_weight()
            with torch.no_grad():
                w.copy_((w.float() - (delta.t() if is_conv1d(self.base_layer) else delta)).to(w.dtype))
        self.merged = False

    def _base4bit(self) -> Linear4bit | None:
        return self.__dict__.get("_unmerged_base")

    def extra_repr(self) -> str:
        rs = ", rslora" if self.use_rslora else ""
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}{rs}, merged={self.merged}"


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """While open, every LoraLinear of `model` computes its (unmerged) base layer alone."""
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            del m.disabled  # back to the class default


def share_seeds(model: nn.Module) -> int:
    """One SeedBank (dropout.py) per block for its dropping LoRA layers; returns the number of banks.

    The blocks are the children of the model's outermost ModuleLists (the decoder layers of every
    transformers model): a pass of a decoder layer then draws its seven seeds in one launch, not
    seven. Layers outside such a block, and blocks with one dropping layer, draw their own."""
    banks, nested = 0, set()
    for m in model.modules():
        if not isinstance(m, nn.ModuleList) or id(m) in nested:
            continue
        for block in m:
            nested.update(id(sub) for sub in block.modules() if isinstance(sub, nn.ModuleList))
            layers = [m for m in block.modules() if isinstance(m, LoraLinear) and isinstance(m.lora_dropout, nn.Dropout)]
            bank = SeedBank(len(layers)) if len(layers) > 1 else None
            for i, layer in enumerate(layers):
                layer.seed_slot = None if bank is None else (bank, i)
            banks += bank is not None
    return banks


def _side_by_side(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when contiguous plain tensors a and b of one dtype lie in one storage, b right after a."""
    n = a.numel()
    return (type(a) is torch.Tensor and type(b) is torch.Tensor and a.dtype == b.dtype and a.device == b.device
            and b.data_ptr() == a.data_ptr() + n * a.element_size() and a.is_contiguous() and b.is_contiguous()
            and a.untyped_storage().nbytes() >= (a.storage_offset() + n + b.numel()) * a.element_size())


def _device(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")
