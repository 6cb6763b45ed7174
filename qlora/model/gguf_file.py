"""Read and write GGUF files (llama.cpp's format): a bounded, validated reader and a streaming writer.

    f = read_gguf("model.Q4_1.gguf")                  # header only: fields + tensor table, all checked
    f.get("general.architecture")                      # "llama"
    w = f.read("blk.0.attn_q.weight")                  # float32, torch shape (ggml dims reversed)
    write_gguf("out.gguf", f.fields, [(n, t.shape, t.ggml_type) for n, t in f.tensors.items()], f.read)

The reader never trusts a declared size: every count, length and offset is checked against
the bytes left in the file (and a sane cap) before anything is allocated from it, so a
hostile or truncated file raises `GGUFError` naming the file, the field or tensor, and the
byte offset, never another exception or a huge allocation. Tensor bytes are memory-mapped
one tensor at a time and decoded in torch (Q4_0/Q4_1/Q8_0: ggml_blocks.py), with plain numpy
(F32/F16/BF16 and the integer types) or with `gguf.quants` (the other types). The writer emits the whole header first, then asks `data(name)` for one tensor
at a time, so the peak is one tensor; it writes a temp file beside the target, fsyncs and
renames, so a failure leaves any existing file untouched (and the temp file of a writer killed
outright is removed by the next write: temp_files.py).

Test: `python -m pytest tests/model/test_gguf_file.py tests/fuzz -q`
"""
from __future__ import annotations

import contextlib
import errno
import mmap
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from tqdm import tqdm

from ..errors import CheckpointError
from . import ggml_blocks
from .temp_files import temp_beside

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 20
MAX_STRING = 64 << 20  # bytes; the longest real strings (chat templates) are a few KiB
MAX_KEYS = 1_000_000
MAX_TENSORS = 1_000_000
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ELEMENTS = 1 << 40
# Smallest possible encodings, so a count can be bounded by the bytes left before reading on:
# a key-value is a key (8-byte length + >= 0 bytes), a 4-byte type and a >= 1-byte value;
# a tensor info is a name (>= 8), n_dims (4), >= 1 dim (8), a type (4) and an offset (8).
DEQUANTIZE_CHUNK = 1 << 20
"""Quantized tensors are decoded this many elements (whole rows) at a time into one float32 output."""
MIN_KV_BYTES = 13
_U64 = struct.Struct("<Q")
MIN_TENSOR_INFO_BYTES = 32

# struct format of each scalar value type; numpy reads the same codes for arrays
_FORMATS: dict[int, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<B", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
# ggml types decoded by a plain numpy cast (BF16 by a shift; the rest by gguf.quants)
_PLAIN: dict[int, str] = {
    GGMLQuantizationType.F32: "<f4", GGMLQuantizationType.F16: "<f2", GGMLQuantizationType.F64: "<f8",
    GGMLQuantizationType.I8: "<i1", GGMLQuantizationType.I16: "<i2", GGMLQuantizationType.I32: "<i4",
    GGMLQuantizationType.I64: "<i8",
}
WRITABLE = tuple(GGMLQuantizationType[n] for n in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"))


class GGUFError(CheckpointError):
    """A GGUF file that cannot be read or written; the message names the file, what is at fault and where."""


@dataclass(frozen=True)
class GGUFValue:
    """One metadata value with its GGUF type: numbers, bool, str, or a list with `item_type`."""

    value_type: int
    value: Any
    item_type: int | None = None


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lies: torch-order `shape`, ggml type, absolute byte `offset` and `nbytes`."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int


@dataclass
class GGUFFile:
    """A parsed GGUF header; `read` maps and decodes one tensor at a time."""

    path: Path
    version: int
    alignment: int
    fields: dict[str, GGUFValue]
    tensors: dict[str, GGUFTensorInfo]

    def get(self, key: str, default: Any = None) -> Any:
        """The plain python value of field `key` (a list for arrays), or `default`."""
        field = self.fields.get(key)
        return default if field is None else field.value

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name` dequantized to float32 in torch shape, reading exactly its byte range."""
        info = self.tensors.get(name)
        if info is None:
            raise GGUFError(f"{self.path}: no tensor {name!r} among its {len(self.tensors)} tensors")
        try:
            raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,))
        except (OSError, ValueError) as e:
            raise GGUFError(
                f"{self.path}: tensor {name!r} at byte {info.offset}: cannot map its {info.nbytes} bytes ({e}); "
                "the file changed since its header was read, read it again"
            ) from None
        t = info.ggml_type
        # the output is torch's memory (numpy views of it): torch's allocator reports count it, so a
        # tensor the model keeps as it is (embeddings, norms) is in the trainer's live-tensor peak
        numel = math.prod(info.shape)
        if t in _PLAIN:
            values = torch.empty(numel, dtype=torch.float32).numpy()
            np.copyto(values, np.frombuffer(raw, _PLAIN[t]))
        elif t == GGMLQuantizationType.BF16:
            values = torch.empty(numel, dtype=torch.int32).numpy().view(np.uint32)
            np.copyto(values, np.frombuffer(raw, "<u2"))
            values <<= 16  # in place: no second copy
            values = values.view(np.float32)
        else:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(t)]
            rows = raw.reshape(-1, info.shape[-1] // block * type_size)
            out = torch.empty((rows.shape[0], info.shape[-1]), dtype=torch.float32)
            values = out.numpy()
            step = max(1, DEQUANTIZE_CHUNK // info.shape[-1])  # the decoders' temporaries are several x their output
            try:
                for i in range(0, rows.shape[0], step):
                    if t in ggml_blocks.TYPES:
                        ggml_blocks.decode_blocks(torch.from_numpy(np.array(rows[i : i + step])), t, out[i : i + step])
                    else:
                        values[i : i + step] = quants.dequantize(rows[i : i + step], GGMLQuantizationType(t))
            except NotImplementedError:
                raise GGUFError(
                    f"{self.path}: tensor {name!r} has type {GGMLQuantizationType(t).name}, which the installed "
                    "gguf package cannot dequantize; upgrade gguf (pip install -U gguf)"
                ) from None
        return torch.from_numpy(values.reshape(info.shape))


def tensor_nbytes(shape: tuple[int, ...], ggml_type: int) -> int:
    """Bytes of a tensor of torch `shape` and `ggml_type`; ValueError saying which rule it breaks."""
    if not 1 <= len(shape) <= MAX_DIMS:
        raise ValueError(f"{len(shape)} dims, GGUF allows 1 to {MAX_DIMS}")
    elements = 1
    for d in shape:
        if d < 1:
            raise ValueError(f"shape {shape} has a dim < 1")
        elements *= d
        if elements > MAX_ELEMENTS:
            raise ValueError(f"shape {shape} has over 2^40 elements")
    if ggml_type not in GGML_QUANT_SIZES:
        raise ValueError(f"unknown ggml type {ggml_type}")
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    if shape[-1] % block:
        raise ValueError(f"row length {shape[-1]} is not a multiple of {GGMLQuantizationType(ggml_type).name}'s block of {block}")
    return elements // block * type_size


class _Cursor:
    """A read position over the file's bytes that checks every length against the bytes left."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def left(self) -> int:
        return self.size - self.pos

    def fail(self, what: str, at: int | None = None) -> GGUFError:
        return GGUFError(
            f"{self.path}: {what} (at byte {self.pos if at is None else at} of {self.size}); "
            "the file is corrupt, truncated or not GGUF: re-download or re-convert it"
        )

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise self.fail(f"{what} needs {n} bytes but only {self.left()} remain")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        at = self.pos
        n = self.scalar("<Q", f"{what} length")
        if n > MAX_STRING:
            raise self.fail(f"{what} length {n} exceeds the 64 MiB limit", at)
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8 ({e.reason})", at + 8 + e.start) from None

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings in a row: `string`'s checks without building its messages per item
        (a vocabulary is ~10^5 strings); any item that fails them goes through `string` to raise."""
        buf, size, pos, out = self.buf, self.size, self.pos, []
        for i in range(count):
            if size - pos >= 8:
                end = pos + 8 + _U64.unpack_from(buf, pos)[0]
                if end - pos - 8 <= MAX_STRING and end <= size:
                    with contextlib.suppress(UnicodeDecodeError):
                        out.append(str(buf[pos + 8:end], "utf-8"))
                        pos = end
                        continue
            self.pos = pos
            out.append(self.string(f"{what} item {i}"))
            pos = self.pos
        self.pos = pos
        return out


def _read_value(cur: _Cursor, key: str) -> GGUFValue:
    """The typed value after key `key`, every count checked before it is used."""
    at = cur.pos
    vtype = cur.scalar("<I", f"field {key!r} value type")
    if vtype == GGUFValueType.STRING:
        return GGUFValue(vtype, cur.string(f"field {key!r}"))
    if vtype in _FORMATS:
        return GGUFValue(vtype, _numbers(cur, vtype, 1, f"field {key!r}")[0])
    if vtype != GGUFValueType.ARRAY:
        raise cur.fail(f"field {key!r} has unknown value type {vtype}", at)
    at = cur.pos
    item = cur.scalar("<I", f"field {key!r} array item type")
    if item == GGUFValueType.ARRAY:
        raise cur.fail(f"field {key!r} is a nested array, which GGUF readers do not support", at)
    if item not in _FORMATS and item != GGUFValueType.STRING:
        raise cur.fail(f"field {key!r} array has unknown item type {item}", at)
    count = cur.scalar("<Q", f"field {key!r} array count")
    least = 8 if item == GGUFValueType.STRING else struct.calcsize(_FORMATS[item])
    if count > cur.left() // least:
        raise cur.fail(f"field {key!r} array count {count} needs at least {count * least} bytes, only {cur.left()} remain", at + 4)
    if item == GGUFValueType.STRING:
        return GGUFValue(vtype, cur.strings(count, f"field {key!r}"), item)
    return GGUFValue(vtype, _numbers(cur, item, count, f"field {key!r}"), item)


def _numbers(cur: _Cursor, vtype: int, count: int, what: str) -> list:
    """`count` numbers of `vtype` as python values; bools must be 0 or 1."""
    at = cur.pos
    dtype = np.dtype(_FORMATS[vtype])
    values = np.frombuffer(cur.take(count * dtype.itemsize, what), dtype)
    if vtype == GGUFValueType.BOOL:
        if count and values.max() > 1:
            raise cur.fail(f"{what} has a bool byte {values.max()} (must be 0 or 1)", at)
        values = values.astype(bool)
    return values.tolist()


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse and validate the header of GGUF file `path` (tensor bytes are read by `GGUFFile.read`)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise GGUFError(f"{path}: {size} bytes, too short for a GGUF header (24); the file is truncated or not GGUF")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(_Cursor(buf, path))
    except OSError as e:
        raise GGUFError(f"{path}: cannot read ({e.strerror or e})") from None


def _parse(cur: _Cursor) -> GGUFFile:
    if cur.take(4, "magic") != MAGIC:
        raise cur.fail("magic is not b'GGUF'", 0)
    version = cur.scalar("<I", "version")
    if version not in VERSIONS:
        hint = ", a big-endian file" if version & 0xFFFF == 0 else ""
        raise cur.fail(f"version {version}{hint}; only little-endian GGUF versions 2 and 3 are supported", 4)
    n_tensors, n_kv = cur.scalar("<Q", "tensor_count"), cur.scalar("<Q", "kv_count")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KEYS:
        raise cur.fail(f"tensor_count {n_tensors} / kv_count {n_kv} exceed the caps of {MAX_TENSORS} / {MAX_KEYS}", 8)
    if n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES > cur.left():
        raise cur.fail(f"tensor_count {n_tensors} and kv_count {n_kv} cannot fit in the {cur.left()} bytes left", 8)

    fields: dict[str, GGUFValue] = {}
    alignment = DEFAULT_ALIGNMENT
    for i in range(n_kv):
        at = cur.pos
        key = cur.string(f"key {i}")
        if key in fields:
            raise cur.fail(f"duplicate key {key!r}", at)
        fields[key] = field = _read_value(cur, key)
        if key == "general.alignment":
            alignment = field.value
            if field.value_type != GGUFValueType.UINT32 or not 1 <= alignment <= MAX_ALIGNMENT or alignment & (alignment - 1):
                raise cur.fail(f"field 'general.alignment' must be a UINT32 power of two up to 1 MiB, got {field}", at)

    infos: list[tuple[str, tuple[int, ...], int, int, int, int]] = []  # name, shape, type, offset, nbytes, info byte
    for i in range(n_tensors):
        at = cur.pos
        name = cur.string(f"tensor {i} name")
        n_dims = cur.scalar("<I", f"tensor {name!r} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dims, GGUF allows 1 to {MAX_DIMS}", at)
        dims = struct.unpack(f"<{n_dims}Q", cur.take(8 * n_dims, f"tensor {name!r} dims"))
        ggml_type = cur.scalar("<I", f"tensor {name!r} ggml type")
        offset = cur.scalar("<Q", f"tensor {name!r} offset")
        shape = tuple(reversed(dims))
        try:
            nbytes = tensor_nbytes(shape, ggml_type)
        except ValueError as e:
            raise cur.fail(f"tensor {name!r}: {e}", at) from None
        if offset % alignment:
            raise cur.fail(f"tensor {name!r} offset {offset} is not a multiple of the alignment {alignment}", at)
        infos.append((name, shape, ggml_type, offset, nbytes, at))

    data_start = -(-cur.pos // alignment) * alignment
    tensors: dict[str, GGUFTensorInfo] = {}
    end = data_start
    for name, shape, ggml_type, offset, nbytes, at in sorted(infos, key=lambda t: t[3]):
        if name in tensors:
            raise cur.fail(f"duplicate tensor name {name!r}", at)
        start = data_start + offset
        if start < end:
            raise cur.fail(f"tensor {name!r} (bytes {start}..{start + nbytes}) overlaps the tensor before it", at)
        end = start + nbytes
        if end > cur.size:
            raise cur.fail(f"tensor {name!r} ends at byte {end}, past the end of the file", at)
        tensors[name] = GGUFTensorInfo(name, shape, ggml_type, start, nbytes)
    tensors = {name: tensors[name] for name, *_ in infos}  # back to file order
    return GGUFFile(cur.path, version, alignment, fields, tensors)


def find_gguf(path: str | os.PathLike) -> Path | None:
    """`path` if it is a .gguf file, else the single .gguf file inside directory `path`, else None."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    files = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(files) > 1:
        raise GGUFError(f"{path}: several .gguf files ({', '.join(f.name for f in files)}); pass the path of the one to use")
    return files[0] if files else None


def gguf_value(v: Any) -> GGUFValue:
    """A typed value from a python one: bool -> BOOL, int -> INT32 if it fits, else UINT32, INT64,
    UINT64 (the first that holds it), float -> FLOAT32, str -> STRING, a non-empty list -> ARRAY of
    the type its items share (ints: the first of those types that holds them all). Build a
    `GGUFValue` by hand for anything else (FLOAT64, UINT8, an empty array, ...)."""
    if isinstance(v, list):
        if not v or any(isinstance(x, list) for x in v):
            raise GGUFError(f"gguf_value({v!r:.60}): cannot infer an array type from an empty or nested list")
        items = [gguf_value(x).value_type for x in v]
        if all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            items = [_int_type(min(v), max(v))]
        if len(set(items)) > 1:
            raise GGUFError(f"gguf_value({v!r:.60}): items of different types; build GGUFValue(ARRAY, ...) by hand")
        return GGUFValue(GGUFValueType.ARRAY, list(v), items[0])
    if isinstance(v, bool):
        return GGUFValue(GGUFValueType.BOOL, v)
    if isinstance(v, int):
        return GGUFValue(_int_type(v, v), v)
    if isinstance(v, float):
        return GGUFValue(GGUFValueType.FLOAT32, v)
    if isinstance(v, str):
        return GGUFValue(GGUFValueType.STRING, v)
    raise GGUFError(f"gguf_value({v!r:.60}): no GGUF type for {type(v).__name__}")


def _int_type(lo: int, hi: int) -> int:
    for vtype, low, high in ((GGUFValueType.INT32, -(1 << 31), 1 << 31), (GGUFValueType.UINT32, 0, 1 << 32),
                             (GGUFValueType.INT64, -(1 << 63), 1 << 63), (GGUFValueType.UINT64, 0, 1 << 64)):
        if low <= lo and hi < high:
            return vtype
    raise GGUFError(f"gguf_value: integers {lo}..{hi} do not fit in 64 bits")


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _encode_value(v: GGUFValue) -> bytes:
    """Type code + payload of `v`; TypeError/ValueError/struct.error/OverflowError if it does not fit."""
    if v.value_type == GGUFValueType.STRING:
        return struct.pack("<I", v.value_type) + _string(v.value)
    if v.value_type in _FORMATS:
        if v.value_type == GGUFValueType.BOOL and v.value not in (0, 1):
            raise ValueError("a bool must be True or False")
        return struct.pack("<I", v.value_type) + struct.pack(_FORMATS[v.value_type], v.value)
    if v.value_type != GGUFValueType.ARRAY:
        raise ValueError(f"unknown value type {v.value_type}")
    head = struct.pack("<IIQ", v.value_type, v.item_type, len(v.value))
    if v.item_type == GGUFValueType.STRING:
        return head + b"".join(_string(s) for s in v.value)
    if v.item_type not in _FORMATS:
        raise ValueError(f"array item type {v.item_type} is not a scalar or string type")
    return head + b"".join(_encode_value(GGUFValue(v.item_type, x))[4:] for x in v.value)


def _header(path: Path, fields: dict[str, GGUFValue], tensors: list[tuple[str, tuple[int, ...], int]],
            alignment: int) -> tuple[bytes, list[tuple[str, tuple[int, ...], int, int]]]:
    """The header bytes (padded to `alignment`) and each tensor's (name, shape, type, nbytes)."""
    if not 1 <= alignment <= MAX_ALIGNMENT or alignment & (alignment - 1):
        raise GGUFError(f"{path}: alignment {alignment} is not a power of two up to 1 MiB")
    fields, own = dict(fields), GGUFValue(GGUFValueType.UINT32, alignment)
    if alignment != DEFAULT_ALIGNMENT or "general.alignment" in fields:
        if fields.setdefault("general.alignment", own) != own:  # readers must learn a non-default alignment
            raise GGUFError(f"{path}: fields['general.alignment'] = {fields['general.alignment']} but alignment={alignment}")
    parts = [MAGIC, struct.pack("<IQQ", 3, len(tensors), len(fields))]
    for key, value in fields.items():
        try:
            parts += [_string(key), _encode_value(value)]
        except (TypeError, ValueError, AttributeError, OverflowError, struct.error) as e:
            raise GGUFError(f"{path}: field {key!r} = {value!r:.80} cannot be written ({type(e).__name__}: {e})") from None
    layout, names, offset = [], set(), 0
    for name, shape, ggml_type in tensors:
        shape = tuple(int(d) for d in shape)
        if ggml_type not in WRITABLE:
            raise GGUFError(f"{path}: tensor {name!r}: can write types {', '.join(t.name for t in WRITABLE)}, not {ggml_type}")
        try:
            nbytes = tensor_nbytes(shape, ggml_type)
        except ValueError as e:
            raise GGUFError(f"{path}: tensor {name!r}: {e}") from None
        if name in names:
            raise GGUFError(f"{path}: tensor name {name!r} given twice")
        names.add(name)
        parts += [_string(name), struct.pack(f"<I{len(shape)}QIQ", len(shape), *reversed(shape), ggml_type, offset)]
        layout.append((name, shape, ggml_type, nbytes))
        offset += nbytes + -nbytes % alignment
    header = b"".join(parts)
    return header + bytes(-len(header) % alignment), layout


def _encode_tensor(x: torch.Tensor | np.ndarray, shape: tuple[int, ...], ggml_type: int) -> np.ndarray:
    """The ggml bytes of `x` (any float dtype, torch shape `shape`) as `ggml_type`."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape != shape:
        raise ValueError(f"data() gave shape {x.shape}, the header says {shape}")
    if ggml_type == GGMLQuantizationType.F32:
        return x
    if ggml_type == GGMLQuantizationType.F16:
        return x.astype("<f2")
    return np.ascontiguousarray(quants.quantize(x, GGMLQuantizationType(ggml_type)))


def write_gguf(path: str | os.PathLike, fields: dict[str, GGUFValue], tensors: list[tuple[str, tuple[int, ...], int]],
               data: Callable[[str], torch.Tensor | np.ndarray], alignment: int = DEFAULT_ALIGNMENT,
               progress: bool = False) -> None:
    """Write GGUF v3 file `path`: `fields`, then each (name, torch shape, ggml type) in `tensors`
    filled from `data(name)` one at a time and quantized to its type (one of `WRITABLE`).
    Atomic: a temp file beside `path`, fsynced and renamed; on any error it is removed, an
    existing `path` is left as it was, and GGUFError names the path and the tensor."""
    path = Path(path)
    header, layout = _header(path, fields, tensors, alignment)  # every check before a file exists
    try:
        tmp = temp_beside(path, suffix=".tmp")  # what a killed writer left is removed here
    except OSError as e:
        raise GGUFError(f"{path}: cannot create a file in {path.parent} ({e.strerror or e})") from None
    name = None
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            for name, shape, ggml_type, nbytes in tqdm(layout, desc=f"writing {path.name}", disable=not progress):
                blob = _encode_tensor(data(name), shape, ggml_type)
                if blob.nbytes != nbytes:
                    raise ValueError(f"encoded to {blob.nbytes} bytes, expected {nbytes}")
                f.write(blob)
                f.write(bytes(-nbytes % alignment))
            name = None
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if not isinstance(e, Exception):
            raise
        where = f"tensor {name!r}" if name is not None else "the file"
        hint = "free some disk space and retry" if getattr(e, "errno", None) == errno.ENOSPC else "fix the cause and retry"
        raise GGUFError(f"{path}: writing {where} failed ({type(e).__name__}: {e}); {path} was left as it was, {hint}") from e
