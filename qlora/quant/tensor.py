"""QuantizedTensor: a weight stored as packed 4-bit codes plus block scales.

    qt = qlora.quantize(w, quant_type="nf4", blocksize=64, double_quant=True)
    w_hat = qt.dequantize(torch.bfloat16)            # or qt.dequantize(out=buffer)
    sd = qt.state_dict(prefix="weight")              # bitsandbytes' serialized layout
    qt2 = QuantizedTensor.from_state_dict(sd, prefix="weight")

Storage (formats.md sections 2-4): `data` is uint8 [(n+1)//2, 1], two codes a byte,
high nibble first. Without double quantization `absmax` holds one float32 scale per
block; with it, `absmax` holds uint8 codes of (scale - nested_offset) in the signed
dynamic map, one float32 `nested_absmax` per 256 blocks. Decoding runs in a native
kernel when one is available (qlora/kernels), else in blockwise.py.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

from ..errors import InputError, QloraError
from .. import kernels
from ..kernels.packed import NESTED_BLOCKSIZE
from .blockwise import dequantize_4bit_ref, nearest, pack_4bit, quantize_4bit_ref, sort_order, thresholds
from .blockwise8 import dequantize_8bit, quantize_8bit_grid
from .codebooks import QUANT_TYPES, codebook, signed_dynamic_map

BLOCKSIZES = tuple(2**k for k in range(5, 13))
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class QuantStateError(QloraError, ValueError):
    """Stored 4-bit tensors whose layout or JSON quant state is inconsistent; the message names the key."""


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def _dtype_from_name(name: str, where: str) -> torch.dtype:
    for dtype, dname in _DTYPE_NAMES.items():
        if name in (dname, f"torch.{dname}"):
            return dtype
    raise QuantStateError(f"{where}: unknown dtype {name!r}; expected one of {sorted(_DTYPE_NAMES.values())}")


def _state_key(quant_type: str) -> str:
    owner = "qlora" if quant_type == "int4" else "bitsandbytes"
    return f"quant_state.{owner}__{quant_type}"


@dataclass
class QuantizedTensor:
    """Packed 4-bit codes + scales of one tensor; see the module docstring for the layout."""

    data: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    quant_type: str = "nf4"
    blocksize: int = 64
    code: torch.Tensor = field(default_factory=lambda: codebook("nf4").clone())
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_offset: float | None = None

    # ---- properties -------------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.data.device

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor stored (codes, scales, nested scales; not the code books)."""
        parts = [self.data, self.absmax] + ([self.nested_absmax] if self.double_quant else [])
        return sum(t.numel() * t.element_size() for t in parts) + (4 if self.double_quant else 0)

    @property
    def bits_per_param(self) -> float:
        """Storage bits per element: 4.127 for NF4 + DQ at blocksize 64, 4.5 without DQ."""
        return 8 * self.nbytes / self.numel()

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (
            f"QuantizedTensor(shape={tuple(self.shape)}, {self.quant_type}, blocksize={self.blocksize}{dq}, "
            f"dtype={_dtype_name(self.dtype)}, {self.bits_per_param:.3f} bits/param, device={self.device})"
        )

    # ---- decoding ---------------------------------------------------------------------
    def scales(self) -> torch.Tensor:
        """The float32 scale of every block (decoding the double quantization if any)."""
        if not self.double_quant:
            return self.absmax
        assert self.nested_code is not None and self.nested_offset is not None
        scaled = dequantize_8bit(self.absmax, self.nested_absmax, self.nested_code, NESTED_BLOCKSIZE)
        return scaled + torch.tensor(self.nested_offset, dtype=torch.float32, device=scaled.device)

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Decode to `dtype` (default: the original dtype) in the original shape.

        With `out`, decode into that preallocated contiguous tensor (its dtype wins) and
        return it: no allocation of the output on the hot path.
        """
        if out is not None:
            if out.numel() != self.numel() or not out.is_contiguous() or out.device != self.device:
                raise ValueError(
                    f"out must be a contiguous {tuple(self.shape)} tensor on {self.device}; "
                    f"got {tuple(out.shape)} on {out.device} (contiguous={out.is_contiguous()})"
                )
            if out.dtype not in FLOAT_DTYPES:
                raise TypeError(f"out has dtype {out.dtype}; expected one of float32, float16, bfloat16")
            if dtype is not None and dtype != out.dtype:
                raise TypeError(f"dtype={dtype} disagrees with out.dtype={out.dtype}")
        dtype = out.dtype if out is not None else (dtype or self.dtype)
        if out is None:
            out = torch.empty(self.shape, dtype=dtype, device=self.device)
        if not kernels.decode_4bit(self, out):
            out.view(-1).copy_(
                dequantize_4bit_ref(self.data, self.scales(), self.code, self.blocksize, self.numel(), dtype)
            )
        return out.view(self.shape)

    # ---- movement ---------------------------------------------------------------------
    def to(self, device: torch.device | str) -> "QuantizedTensor":
        """A copy on `device` (the same object if already there)."""
        device = torch.device(device)
        if self.device == device:
            return self
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedTensor(
            move(self.data), move(self.absmax), self.shape, self.dtype, self.quant_type, self.blocksize,
            move(self.code), move(self.nested_absmax), move(self.nested_code), self.nested_offset,
        )

    # ---- serialization ----------------------------------------------------------------
    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """Tensors under bitsandbytes' keys (formats.md section 4), JSON blob included."""
        info: dict = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        sd = {prefix: self.data, f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.code}
        if self.double_quant:
            info.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=self.nested_offset)
            sd[f"{prefix}.nested_absmax"] = self.nested_absmax
            sd[f"{prefix}.nested_quant_map"] = self.nested_code
        blob = json.dumps(info).encode("utf-8")
        sd[f"{prefix}.{_state_key(self.quant_type)}"] = torch.tensor(list(blob), dtype=torch.uint8)
        return sd

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], prefix: str = "weight") -> "QuantizedTensor":
        """Read the layout that `state_dict` (or bitsandbytes / transformers) wrote."""
        blob_keys = [k for k in state_dict if k.startswith(f"{prefix}.quant_state.")]
        if len(blob_keys) != 1:
            raise QuantStateError(
                f"{prefix}: expected exactly one '{prefix}.quant_state.<owner>__<type>' entry, found {blob_keys or 'none'}"
            )
        info = _quant_state(blob_keys[0], state_dict[blob_keys[0]])

        def need(key: str) -> torch.Tensor:
            if key not in state_dict:
                raise QuantStateError(f"missing tensor {key!r} for quantized weight {prefix!r}")
            return state_dict[key]

        quant_type, blocksize, shape = info["quant_type"], info["blocksize"], torch.Size(info["shape"])
        dtype = _dtype_from_name(info["dtype"], blob_keys[0])
        n = math.prod(shape)
        data = need(prefix)
        data = data.contiguous().view(torch.uint8).reshape(-1, 1) if data.dtype != torch.uint8 else data.reshape(-1, 1)
        nblocks = -(-n // blocksize)
        absmax, code = need(f"{prefix}.absmax").reshape(-1), need(f"{prefix}.quant_map").float().reshape(-1)
        _expect(f"{prefix}", data, (n + 1) // 2)
        _expect(f"{prefix}.absmax", absmax, nblocks)
        _expect(f"{prefix}.quant_map", code, 16)
        nested = "nested_offset" in info
        qt = cls(data, absmax, shape, dtype, quant_type, blocksize, code)
        if nested:
            if absmax.dtype != torch.uint8:
                raise QuantStateError(f"{prefix}.absmax: double-quantized scales must be uint8, got {absmax.dtype}")
            qt.nested_absmax = need(f"{prefix}.nested_absmax").float().reshape(-1)
            qt.nested_code = need(f"{prefix}.nested_quant_map").float().reshape(-1)
            qt.nested_offset = float(info["nested_offset"])
            _expect(f"{prefix}.nested_absmax", qt.nested_absmax, -(-nblocks // NESTED_BLOCKSIZE))
            _expect(f"{prefix}.nested_quant_map", qt.nested_code, 256)
        elif absmax.dtype != torch.float32:
            raise QuantStateError(f"{prefix}.absmax: scales without double quantization must be float32, got {absmax.dtype}")
        return qt


def _quant_state(key: str, blob: torch.Tensor) -> dict:
    """The JSON quant state stored as bytes under `key`, its types and values checked."""
    def bad(message: str) -> QuantStateError:
        return QuantStateError(f"{key}: {message}; the checkpoint is corrupt: re-download or re-quantize it")

    if blob.dtype != torch.uint8:
        raise bad(f"expected the bytes of a JSON object (uint8), got {blob.dtype}")
    try:
        info = json.loads(bytes(blob.reshape(-1).tolist()).decode("utf-8"))
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested too deep
        raise bad(f"not a UTF-8 JSON quant state ({e})") from None
    if not isinstance(info, dict):
        raise bad(f"the quant state is a JSON {type(info).__name__}, not an object")
    if info.get("quant_type") not in QUANT_TYPES:
        raise bad(f"unknown quant_type {info.get('quant_type')!r:.40}; expected one of {QUANT_TYPES}")
    named = key.rpartition("__")[2]
    if named in QUANT_TYPES and named != info["quant_type"]:
        raise bad(f"the key says {named}, the JSON quant state says {info['quant_type']}")
    for name in ("blocksize", "dtype", "shape"):
        if name not in info:
            raise bad(f"JSON quant state lacks {name!r}")
    if type(info["blocksize"]) is not int or info["blocksize"] not in BLOCKSIZES:
        raise bad(f"blocksize {info['blocksize']!r:.40} is not a power of two from 32 to 4096")
    if not isinstance(info["dtype"], str):
        raise bad(f"dtype {info['dtype']!r:.40} is not a name")
    shape = info["shape"]
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d > 0 for d in shape):
        raise bad(f"shape {shape!r:.60} is not a list of positive ints")
    if "nested_offset" in info:
        offset = info["nested_offset"]
        if not isinstance(offset, (int, float)) or isinstance(offset, bool) or not math.isfinite(offset):
            raise bad(f"nested_offset {offset!r:.40} is not a finite number")
        if info.get("nested_blocksize", NESTED_BLOCKSIZE) != NESTED_BLOCKSIZE:
            raise bad(f"nested_blocksize {info['nested_blocksize']!r:.40} is not {NESTED_BLOCKSIZE}")
    return info


def _expect(name: str, t: torch.Tensor, count: int) -> None:
    if t.numel() != count:
        raise QuantStateError(f"{name}: expected {count} elements, found shape {tuple(t.shape)}")


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise InputError(f"unsupported blocksize {blocksize}: use a power of two from 32 to 4096")


def quantize(
    tensor: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
) -> QuantizedTensor:
    """Quantize a float tensor (any shape, CPU or CUDA) block-wise to 4 bits.

    `quant_type`: "nf4" (QLoRA), "fp4" (bitsandbytes' 4-bit float) or "int4" (absmax
    integers). `double_quant` also quantizes the block scales to 8 bits (blocks of 256,
    mean removed). Bit-exact with bitsandbytes' `quantize_4bit` for nf4 and fp4.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"quantize expects a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"quantize expects a float32, float16 or bfloat16 tensor, got {tensor.dtype}")
    if quant_type not in QUANT_TYPES:
        raise InputError(f"unknown quant_type {quant_type!r}: expected one of {', '.join(QUANT_TYPES)}")
    _check_blocksize(blocksize)
    if tensor.numel() == 0:
        raise InputError(f"cannot quantize an empty tensor (shape {tuple(tensor.shape)})")
    tensor = tensor.detach().contiguous()
    code = codebook(quant_type).to(tensor.device)
    native = kernels.quantize_4bit(tensor, sort_order(code).to(torch.uint8).contiguous(),
                                   thresholds(code).float().contiguous(), blocksize)
    finite = native[2] if native is not None else bool(torch.isfinite(tensor).all())
    if not finite:
        bad = ~torch.isfinite(tensor)
        raise InputError(
            f"tensor of shape {tuple(tensor.shape)} holds {int(bad.sum())} NaN/Inf value(s), first at index "
            f"{bad.nonzero()[0].tolist()}; quantization needs finite weights"
        )
    data, absmax = native[:2] if native is not None else _quantize_reference(tensor, code, blocksize)
    qt = QuantizedTensor(data.view(-1, 1), absmax, tensor.shape, tensor.dtype, quant_type, blocksize, code.clone())
    return _double_quantize(qt) if double_quant else qt


REFERENCE_CHUNK = 1 << 18
"""The reference quantizes this many elements at a time: its int64 temporaries (16x a 4-bit
weight's bytes, 70 MiB for a 2816 x 1024 layer) would otherwise fragment the heap while a model
loads (peak 366 MiB instead of 190 on a 170M Llama) and cost GPU memory in proportion."""


def _quantize_reference(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_4bit_ref, REFERENCE_CHUNK elements (whole blocks, an even count) at a time."""
    flat = x.reshape(-1)
    n = flat.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=x.device)
    step = max(REFERENCE_CHUNK, blocksize)  # both powers of two: a multiple of the block
    for i in range(0, n, step):
        p, a = quantize_4bit_ref(flat[i : i + step], code, blocksize)
        packed[i // 2 : i // 2 + p.numel()] = p
        absmax[i // blocksize : i // blocksize + a.numel()] = a
    return packed, absmax


def _double_quantize(qt: QuantizedTensor) -> QuantizedTensor:
    """Replace qt's float32 scales by 8-bit codes of (scale - mean) + nested scales, in place."""
    absmax = qt.absmax
    offset = absmax.mean()
    nested_code = signed_dynamic_map().to(absmax.device)
    qt.absmax, qt.nested_absmax = quantize_8bit_grid(absmax - offset, nested_code, NESTED_BLOCKSIZE)
    qt.nested_code, qt.nested_offset = nested_code.clone(), float(offset)
    return qt


def from_codes(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype = torch.bfloat16,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
) -> QuantizedTensor:
    """A QuantizedTensor in the standard layout from chosen 4-bit codes and block scales.

    `codes`: int code indices in row-major element order (any shape, numel = prod(shape));
    `absmax`: float32 scale per block (any positive value is valid, not only max |x|).
    With `double_quant` the scales are double-quantized exactly as `quantize` does, so
    `qt.scales()` then returns the reconstructed scales a loader will decode with.
    """
    if quant_type not in QUANT_TYPES:
        raise InputError(f"unknown quant_type {quant_type!r}: expected one of {', '.join(QUANT_TYPES)}")
    _check_blocksize(blocksize)
    shape = torch.Size(shape)
    n = math.prod(shape)
    nblocks = -(-n // blocksize)
    _expect("codes", codes, n)
    _expect("absmax", absmax, nblocks)
    code = codebook(quant_type).to(codes.device)
    flat = codes.reshape(-1).to(torch.uint8)
    if n % 2:  # the padding nibble is the code of 0, as in bitsandbytes
        flat = torch.cat([flat, nearest(code.new_zeros(1), code).to(torch.uint8)])
    qt = QuantizedTensor(
        pack_4bit(flat).view(-1, 1), absmax.float().reshape(-1).contiguous(), shape, dtype, quant_type, blocksize,
        code.clone(),
    )
    return _double_quantize(qt) if double_quant else qt
