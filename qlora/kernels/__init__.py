"""The ground floor: native and Triton kernels for 4-bit decode and quantize, seeded dropout
and the fused 4-bit + LoRA GEMMs, and the dispatch that picks one (or none) per tensor.

    kernels.decode_4bit(qt, out)                              -> True if a kernel wrote `out`
    kernels.quantize_4bit(x, order, thresholds, bs)           -> (packed, absmax, finite) or None
    kernels.seeded_dropout(x, out, threshold, scale, seed)    -> True if a kernel wrote `out`
        (x2=, out2=, scale2=: a second tensor dropped with the same mask, in the same pass)
    kernels.rotary(q, k, cos, sin, q_out, k_out, backward)   -> True if a kernel wrote q_out, k_out

Files: cpu.py + qlora_cpu.c (the C kernels, built on first use), triton_decode.py,
triton_dropout.py, triton_rotary.py, triton_matmul.py (Triton, imported only where triton imports), packed.py
(Packed4bit: the fields of a 4-bit weight the kernels read; QuantizedTensor has them).
CPU tensors use the C kernels (AVX2 decode where the CPU has AVX2 and F16C, a portable scalar
path elsewhere). Tensors on TRITON_DEVICE_TYPES (CUDA) use Triton when triton imports.
When no kernel runs, these functions say so and the caller runs its pure-PyTorch reference
(quant/blockwise.py, nn/dropout.py, nn/rotary.py), after a one-time warning here: this floor imports
nothing of qlora's. QLORA_KERNELS selects the path: "native" (default), "scalar" (native, no
SIMD) or "reference" (pure PyTorch), read at the first kernel call (`reread_mode()` after
changing it in-process); tests compare all three (tests/kernels).
"""
from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

import torch

from ..errors import InputError
from . import cpu

from .packed import held, launch_key

if TYPE_CHECKING:
    from .packed import Packed4bit

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_warned = False


_MODE: str | None = None


def _mode() -> str:
    """QLORA_KERNELS, read once per process (the hot path reads it several times a layer)."""
    global _MODE
    if _MODE is None:
        mode = os.environ.get("QLORA_KERNELS", "native")
        if mode not in ("native", "scalar", "reference"):
            raise InputError(f"QLORA_KERNELS={mode!r}: expected native, scalar or reference")
        _MODE = mode
    return _MODE


def reread_mode() -> None:
    """Read QLORA_KERNELS again at the next kernel call (after changing it in this process)."""
    global _MODE, _SIMD
    _MODE = _SIMD = None


def reference_only() -> bool:
    """True when QLORA_KERNELS=reference: callers take their pure-PyTorch oracle paths."""
    return _mode() == "reference"


def _native() -> "cpu.ctypes.CDLL | None":
    global _warned
    if _mode() == "reference":
        return None
    lib = cpu.load()
    if lib is None and not _warned:
        _warned = True
        warnings.warn(f"qlora: native CPU kernels unavailable ({cpu.error()}); using the slower PyTorch reference")
    return lib


_SIMD: bool | None = None


def has_simd() -> bool:
    """True when the native decode runs its AVX2 path (asked once per mode)."""
    global _SIMD
    if _SIMD is None:
        lib = _native()
        _SIMD = bool(lib and _mode() == "native" and lib.qlora_has_simd())
    return _SIMD


def _usable(*tensors: torch.Tensor) -> bool:
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous():
            return False
    return True


STREAM_BYTES = 4 << 20
"""Outputs at least this big are written with non-temporal stores (they would not stay in cache)."""


TRITON_DEVICE_TYPES = {"cuda"}
"""Device types whose tensors decode with Triton (tests add "cpu" under TRITON_INTERPRET=1)."""
_triton_error: str | None = None
_triton_warned = False


_triton_decode = _triton_dropout = _triton_rotary = None  # the modules, once imported


def triton_module():
    """The triton_decode module, or None where triton does not import (or QLORA_KERNELS=reference)."""
    global _triton_error, _triton_decode
    if _mode() == "reference" or _triton_error is not None:
        return None
    if _triton_decode is None:
        try:
            from . import triton_decode
        except ImportError as e:
            _triton_error = f"{type(e).__name__}: {e}"
            return None
        _triton_decode = triton_decode
    return _triton_decode


def _triton_for(t: torch.Tensor):
    """triton_module() for a tensor on a TRITON_DEVICE_TYPES device, else None; warns once when
    triton is wanted there but does not import (the reference then runs, several times slower)."""
    global _triton_warned
    if t.device.type not in TRITON_DEVICE_TYPES:
        return None
    module = triton_module()
    if module is None and _mode() != "reference" and not _triton_warned:
        _triton_warned = True
        warnings.warn(f"qlora: triton does not import ({_triton_error}); {t.device.type} tensors decode and drop out "
                      "with the PyTorch reference, several times slower. Install triton (pip install triton)",
                      stacklevel=3)
    return module


def decode_4bit(qt: "Packed4bit", out: torch.Tensor) -> bool:
    """Decode `qt` into the contiguous `out` natively; False when the reference must do it."""
    if out.dtype in _DTYPE_CODES and (module := _triton_for(out)):
        module.decode_4bit(qt, out)
        return True
    key = (out.data_ptr(), out.dtype, out.numel(), *launch_key(qt), torch.get_num_threads(), _MODE)
    call = qt.__dict__.get("_native_call")  # the arguments of this (qt, out)'s last call: the checks passed then
    if call is not None and call[0] == key and out.is_contiguous():
        cpu.load().qlora_decode_4bit(*call[1])
        return True
    lib = _native()
    tensors = [qt.data, qt.absmax, qt.code, out] + ([qt.nested_absmax, qt.nested_code] if qt.double_quant else [])
    if lib is None or not _usable(*tensors) or out.dtype not in _DTYPE_CODES or qt.code.dtype != torch.float32:
        return False
    if qt.double_quant:
        scale, qscale, nested, nested_code = None, qt.absmax.data_ptr(), qt.nested_absmax.data_ptr(), qt.nested_code.data_ptr()
        offset = float(qt.nested_offset)
    else:
        scale, qscale, nested, nested_code, offset = qt.absmax.data_ptr(), None, None, None, 0.0
    nbytes = out.numel() * out.element_size()
    stream = nbytes >= STREAM_BYTES and out.data_ptr() % 32 == 0
    args = (qt.data.data_ptr(), scale, qscale, nested, nested_code, offset, qt.code.data_ptr(), out.data_ptr(),
            qt.numel(), qt.blocksize, _DTYPE_CODES[out.dtype], torch.get_num_threads(), int(has_simd()), int(stream))
    lib.qlora_decode_4bit(*args)
    qt.__dict__["_native_call"] = (key, args, held(qt))  # numbers (no pointer type) and the tensors they point into
    return True


def quantize_4bit(x: torch.Tensor, order: torch.Tensor, thresholds: torch.Tensor,
                  blocksize: int) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """Packed codes [(n+1)//2] uint8, float32 absmax and whether every value was finite, of
    contiguous CPU `x` with the C kernel (nearest code by `thresholds`, uint8 `order` = code
    indices in ascending value, float32 midpoints: blockwise.sort_order / thresholds); None when
    the kernel cannot run (the caller quantizes with the reference)."""
    lib = _native()
    if lib is None or not _usable(x):
        return None
    n = x.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    nonfinite = lib.qlora_quantize_4bit(
        x.data_ptr(), _DTYPE_CODES[x.dtype], n, blocksize, thresholds.data_ptr(), order.data_ptr(),
        packed.data_ptr(), absmax.data_ptr(), torch.get_num_threads(),
    )
    return packed, absmax, not nonfinite


def seeded_dropout(x: torch.Tensor, out: torch.Tensor, threshold: int, scale: float, seed: "int | torch.Tensor",
                   x2: torch.Tensor | None = None, out2: torch.Tensor | None = None, scale2: float = 0.0) -> bool:
    """Seeded dropout (qlora/nn/dropout.py) of contiguous `x` into `out` with Triton (CUDA) or the
    C kernel (CPU); False when the reference must do it. `seed`: an int, or a 0-dim int64 tensor
    on x's device that the kernel reads there (no host read). With `x2` (contiguous, x's size and
    dtype): the same mask drops it into `out2` too, kept values times `scale2`, in the same pass."""
    if x.dtype not in _DTYPE_CODES or (x2 is not None and (x2.dtype != x.dtype or x2.numel() != x.numel())):
        return False
    if isinstance(seed, torch.Tensor) and (seed.dtype != torch.int64 or seed.device != x.device or seed.numel() != 1):
        raise ValueError(f"a dropout seed tensor must be one int64 on {x.device}, got {seed.dtype} "
                         f"{tuple(seed.shape)} on {seed.device}")
    if _triton_for(x):
        global _triton_dropout
        if _triton_dropout is None:
            from . import triton_dropout
            _triton_dropout = triton_dropout
        _triton_dropout.seeded_dropout(x, out, threshold, scale, seed, x2, out2, scale2)
        return True
    lib = _native()
    pair = () if x2 is None else (x2, out2)
    if lib is None or not _usable(x, out, *pair):
        return False
    held = None if isinstance(seed, torch.Tensor) else cpu.ctypes.c_uint64(seed & 0xFFFFFFFFFFFFFFFF)
    pointer = seed.data_ptr() if held is None else cpu.ctypes.addressof(held)
    second = (x2.data_ptr(), out2.data_ptr()) if pair else (None, None)
    lib.qlora_dropout2(x.data_ptr(), out.data_ptr(), *second, x.numel(), _DTYPE_CODES[x.dtype], pointer, threshold,
                       scale, scale2, torch.get_num_threads(), int(has_simd()))
    return True


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_out: torch.Tensor,
           k_out: torch.Tensor, backward: bool = False) -> bool:
    """Rotary embedding (nn/rotary.py) of q and k [batch, heads, tokens, dim] into q_out and
    k_out (each with its input's strides) with cos and sin [batch or 1, tokens, dim], in one
    launch: Triton (CUDA) or the C kernel (CPU). `backward`: q and k are the outputs' gradients,
    and the inputs' gradients are written. False when the reference must do it (see rotary_takes)."""
    if not rotary_takes(q, k, cos, sin) or any(
            out.shape != x.shape or out.stride() != x.stride() or out.dtype != x.dtype or out.device != x.device
            or type(out) is not torch.Tensor for out, x in ((q_out, q), (k_out, k))):
        return False
    cb = 0 if cos.shape[0] == 1 else cos.stride(0)
    if q.device.type in TRITON_DEVICE_TYPES:
        global _triton_rotary
        if _triton_rotary is None:
            from . import triton_rotary
            _triton_rotary = triton_rotary
        _triton_rotary.rotary(q, k, cos, sin, q_out, k_out, backward, cb)
        return True
    batch, hq, tokens, dim = q.shape
    cpu.load().qlora_rotary(q.data_ptr(), q_out.data_ptr(), hq, *q.stride()[:3], k.data_ptr(), k_out.data_ptr(),
                            k.shape[1], *k.stride()[:3], cos.data_ptr(), sin.data_ptr(), cb, cos.stride(1), batch,
                            tokens, dim, _DTYPE_CODES[q.dtype], int(backward), torch.get_num_threads(), int(has_simd()))
    return True


def rotary_takes(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """True when `rotary` runs a kernel on these: plain tensors (no subclass: a fake tensor has no
    memory to write), a kernel there for the device (and QLORA_KERNELS not reference), one float
    dtype, q and k [batch, heads, tokens, dim] with dim even, cos and sin [batch or 1, tokens, dim]
    alike, every last dim contiguous."""
    if any(type(t) is not torch.Tensor for t in (q, k, cos, sin)):  # fake, functional, DTensor...: no storage to write
        return False
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or q.dtype not in _DTYPE_CODES:
        return False
    batch, _, tokens, dim = q.shape
    if dim % 2 or k.shape[0] != batch or k.shape[2:] != q.shape[2:] or cos.shape != sin.shape:
        return False
    if cos.shape[1:] != (tokens, dim) or cos.shape[0] not in (1, batch) or cos.stride() != sin.stride():
        return False
    if any(t.dtype != q.dtype or t.device != q.device or t.stride(-1) != 1 for t in (k, cos, sin)) or q.stride(-1) != 1:
        return False
    if q.device.type in TRITON_DEVICE_TYPES:
        return _triton_for(q) is not None
    return q.device.type == "cpu" and _native() is not None
