"""The safetensors fuzz strategy (tests/fuzz/test_safetensors_fuzz.py and benchmarks/fuzz.py).

From a tiny valid checkpoint (safetensors.torch.save), `mutate` breaks one thing: truncation at
a section boundary or anywhere, bit flips, the header length set to 0 / 2^31 / 2^63, an entry
rewritten with negative, overlapping or short offsets, wrong dtypes and shapes, a deleted
entry, bad __metadata__, a duplicate name, non-UTF-8 bytes, a header that is not an object.
`SafetensorsCase` checks the property, differential against the safetensors library: qlora
returns exactly what the library reads, or raises a QloraError naming the file (never another
exception); it accepts nothing the library rejects and rejects nothing it accepts (but float8
dtypes, which qlora refuses by name); the read
stays under 5 s and the file size + 1 MiB of traced allocations.
"""
from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import torch
from fuzzing import MIB, NON_UTF8, bounded, flip_bits
from safetensors.torch import load as reference_load
from safetensors.torch import save

from qlora.errors import QloraError
from qlora.model.checkpoint_files import read_tensors

SEED = save({
    "a": torch.arange(12, dtype=torch.float32).view(3, 4), "b": torch.ones(5, dtype=torch.bfloat16),
    "c": torch.tensor([7, -1], dtype=torch.int64), "d": torch.tensor([True, False]), "z": torch.zeros(0, 3),
}, metadata={"format": "pt"})


def sections(blob: bytes) -> tuple[int, dict, list[int]]:
    """(header length, header, section boundaries) of a valid safetensors file."""
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8: 8 + n])
    offsets = {8 + n + o for k, v in header.items() if k != "__metadata__" for o in v["data_offsets"]}
    return n, header, sorted({0, 8, 8 + n, len(blob)} | offsets)


def with_header(header_text: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header_text)) + header_text + data


def edit_entry(header: dict, rng: random.Random) -> dict:
    """`header` (a copy) with one tensor entry's field rewritten, the entry deleted, or bad metadata."""
    header = json.loads(json.dumps(header))
    name = rng.choice(sorted(k for k in header if k != "__metadata__"))
    field = rng.choice(["dtype", "shape", "data_offsets", "delete", "metadata"])
    if field == "delete":
        del header[name]
    elif field == "metadata":
        header["__metadata__"] = rng.choice([{"format": 1}, [], None])
    elif field == "dtype":
        header[name]["dtype"] = rng.choice(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X", 3, None])
    elif field == "shape":
        header[name]["shape"] = rng.choice([[rng.randint(-2, 6) for _ in range(rng.randint(0, 3))], "3", [2.0]])
    else:
        header[name]["data_offsets"] = rng.choice([[rng.randint(-16, 200) for _ in range(rng.randint(0, 3))],
                                                   [rng.randint(-16, 200), 2**64]])
    return header


def mutate(blob: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One random mutation of a valid safetensors file: its kind and the bytes."""
    n, header, boundaries = sections(blob)
    kind = rng.choice(["truncate-boundary", "truncate", "flip", "length", "entry", "duplicate", "non-utf8",
                       "not-object"])
    if kind == "truncate-boundary":
        return kind, blob[: max(rng.choice(boundaries) + rng.choice([-1, 0, 1]), 0)]
    if kind == "truncate":
        return kind, blob[: rng.randrange(len(blob) + 1)]
    if kind == "flip":
        return kind, flip_bits(blob, rng, most=8)
    if kind == "length":
        return kind, struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, 2**31, 2**63, 2**64 - 1])) + blob[8:]
    if kind == "entry":
        return kind, with_header(json.dumps(edit_entry(header, rng)).encode(), blob[8 + n:])
    if kind == "duplicate":  # the first entry repeated under its own name, in the JSON text
        text = blob[8: 8 + n].decode().rstrip()
        first = text[1: text.index("}") + 1]
        return kind, with_header(("{" + first + "," + text[1:]).encode(), blob[8 + n:])
    if kind == "non-utf8":
        at = rng.randrange(8, 8 + n)
        return kind, blob[:at] + rng.choice(NON_UTF8) + blob[at + 1:]
    return kind, with_header(rng.choice([b"[]", b"null", b"1", b'"x"', b"[" * 5000, b"{}", b" " * 8]), blob[8 + n:])


def raw(tensors: dict[str, torch.Tensor]) -> dict:
    return {k: (t.dtype, tuple(t.shape), bytes(t.reshape(-1).view(torch.uint8).numpy())) for k, t in tensors.items()}


class SafetensorsCase:
    """Calling it runs one mutated case (files under `workdir`) and returns its outcome."""

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / "case.safetensors"

    def __call__(self, rng: random.Random) -> str:
        kind, data = mutate(SEED, rng)
        return f"{kind}: {self.check(data)}"

    def check(self, data: bytes) -> str:
        """"rejected" or "read"; AssertionError (or any non-QloraError) if the property fails."""
        self.path.write_bytes(data)
        ours = bounded(lambda: raw(dict(read_tensors(self.path))), len(data) + MIB)
        try:
            reference = raw(reference_load(data))
        except Exception as e:  # the library's SafetensorError, or what its Python wrapper raises
            reference = e
        if isinstance(ours, QloraError):  # the library reads float8 too; qlora refuses it, by name
            assert isinstance(reference, Exception) or "unsupported dtype 'F8_" in str(ours), \
                f"qlora rejects a file the library reads: {ours}"
            assert str(self.path) in str(ours), ours
            return "rejected"
        assert ours == reference, "qlora reads other tensors than the library"
        return "read"
