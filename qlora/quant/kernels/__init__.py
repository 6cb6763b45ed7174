"""Fast paths for 4-bit decode and quantize, with the pure-PyTorch reference as fallback.

    kernels.decode_4bit(qt, out)          -> True if a native kernel wrote `out`
    kernels.quantize_4bit(x, code, bs)    -> (packed uint8, float32 absmax)
    kernels.seeded_dropout(x, out, threshold, scale, seed) -> True if a kernel wrote `out`

CPU tensors use the C kernels in qlora_cpu.c (AVX2 decode where the CPU has AVX2 and F16C,
a portable scalar path elsewhere). CUDA tensors decode with the Triton kernel in
triton_decode.py when triton imports (devices listed in TRITON_DEVICE_TYPES). Anything else,
or a machine where the kernels cannot be built or triton does not import, uses blockwise.py
(dropout.py's reference for dropout), after a one-time warning.
QLORA_KERNELS selects the path: "native" (default), "scalar" (native, no SIMD) or
"reference" (pure PyTorch); tests compare all three.
"""
from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

import torch

from .. import blockwise
from . import cpu

if TYPE_CHECKING:
    from ..tensor import QuantizedTensor

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_warned = False


def _mode() -> str:
    mode = os.environ.get("QLORA_KERNELS", "native")
    if mode not in ("native", "scalar", "reference"):
        raise ValueError(f"QLORA_KERNELS={mode!r}: expected native, scalar or reference")
    return mode


def _native() -> "cpu.ctypes.CDLL | None":
    global _warned
    if _mode() == "reference":
        return None
    lib = cpu.load()
    if lib is None and not _warned:
        _warned = True
        warnings.warn(f"qlora: native CPU kernels unavailable ({cpu.error()}); using the slower PyTorch reference")
    return lib


def has_simd() -> bool:
    """True when the native decode runs its AVX2 path."""
    lib = _native()
    return bool(lib and _mode() == "native" and lib.qlora_has_simd())


def _usable(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


STREAM_BYTES = 4 << 20
"""Outputs at least this big are written with non-temporal stores (they would not stay in cache)."""


TRITON_DEVICE_TYPES = {"cuda"}
"""Device types whose tensors decode with Triton (tests add "cpu" under TRITON_INTERPRET=1)."""
_triton_error: str | None = None
_triton_warned = False


def triton_module():
    """The triton_decode module, or None where triton does not import (reason: `triton_error()`)."""
    global _triton_error
    if _mode() == "reference" or _triton_error is not None:
        return None
    try:
        from . import triton_decode as module
    except ImportError as e:
        _triton_error = f"{type(e).__name__}: {e}"
        return None
    return module


def triton_error() -> str | None:
    """Why triton_decode() returned None (None when it did not, or was not asked yet)."""
    return _triton_error


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


def decode_4bit(qt: "QuantizedTensor", out: torch.Tensor) -> bool:
    """Decode `qt` into the contiguous `out` natively; False when the reference must do it."""
    if out.dtype in _DTYPE_CODES and (module := _triton_for(out)):
        module.decode_4bit(qt, out)
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
    lib.qlora_decode_4bit(
        qt.data.data_ptr(), scale, qscale, nested, nested_code, offset, qt.code.data_ptr(), out.data_ptr(),
        qt.numel(), qt.blocksize, _DTYPE_CODES[out.dtype], torch.get_num_threads(), int(has_simd()),
        int(stream),
    )
    return True


def quantize_4bit(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Packed codes [(n+1)//2] uint8 and float32 absmax of contiguous `x`; None if x has NaN/Inf."""
    lib = _native()
    if lib is None or not _usable(x):
        if not bool(torch.isfinite(x).all()):
            return None
        return blockwise.quantize_4bit_ref(x, code, blocksize)
    n = x.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    order = blockwise.sort_order(code).to(torch.uint8).contiguous()
    thresholds = blockwise.thresholds(code).float().contiguous()
    nonfinite = lib.qlora_quantize_4bit(
        x.data_ptr(), _DTYPE_CODES[x.dtype], n, blocksize, thresholds.data_ptr(), order.data_ptr(),
        packed.data_ptr(), absmax.data_ptr(), torch.get_num_threads(),
    )
    return None if nonfinite else (packed, absmax)


def seeded_dropout(x: torch.Tensor, out: torch.Tensor, threshold: int, scale: float, seed: int) -> bool:
    """Seeded dropout (qlora/nn/dropout.py) of contiguous `x` into `out` with Triton (CUDA) or the
    C kernel (CPU); False when the reference must do it."""
    if x.dtype not in _DTYPE_CODES:
        return False
    if _triton_for(x):
        from . import triton_dropout

        triton_dropout.seeded_dropout(x, out, threshold, scale, seed)
        return True
    lib = _native()
    if lib is None or not _usable(x, out):
        return False
    lib.qlora_dropout(x.data_ptr(), out.data_ptr(), x.numel(), _DTYPE_CODES[x.dtype], seed, threshold, scale,
                      torch.get_num_threads(), int(has_simd()))
    return True
