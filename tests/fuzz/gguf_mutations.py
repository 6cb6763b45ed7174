"""The GGUF fuzz strategy, shared by tests/fuzz/test_gguf_fuzz.py (hypothesis) and benchmarks/fuzz.py (a plain loop).

A small valid seed is written by `write_gguf`; an independent walker lists where each of its
header fields lies; `mutate` breaks one thing (truncation, bit flips, a length/count/type field
overwritten with 0 / 2^31 / 2^63 / 2^64-1 / a negative-as-unsigned value, a duplicated name,
non-UTF-8 bytes in a string); `GGUFCase` runs one mutated case and checks the property:

  read_gguf, then reading every tensor, either raises GGUFError or returns tensors of their
  declared shapes (and, for a truncated file, exactly the seed's content); no other exception,
  under 5 s, and tracemalloc's peak under the file's size + 1 MiB.
"""
from __future__ import annotations

import random
import struct
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from qlora.model.gguf_file import GGUFError, GGUFFile, GGUFValue, gguf_value, read_gguf, write_gguf

# equal-length keys and tensor names, so one can be copied over another to make a duplicate
FIELDS = {
    "k.str": gguf_value("llama"), "k.u32": GGUFValue(V.UINT32, 7), "k.f32": gguf_value(0.5), "k.bol": gguf_value(True),
    "k.sar": gguf_value(["a", "bc", "ü"]), "k.iar": gguf_value([1, -2, 3]),
}
TENSORS = [("t.a", (2, 8), Q.F32), ("t.b", (1, 32), Q.Q8_0), ("t.c", (2, 32), Q.Q4_0), ("t.d", (4,), Q.F16)]
INTERESTING = (0, 1, 1 << 31, (1 << 32) - 1, 1 << 63, (1 << 64) - 1, (1 << 64) - 32)
MIB = 1 << 20


@dataclass(frozen=True)
class Field:
    """A header field of the seed: where it starts, its width in bytes, and its kind."""

    offset: int
    width: int
    kind: str  # "count", "length", "type", "dim", "offset", "version" or "string" (the bytes of one)


def write_seed(path: Path) -> None:
    """The valid seed file: every value kind, four tensors (F32, Q8_0, Q4_0, F16)."""
    g = torch.Generator().manual_seed(0)
    data = {name: torch.randn(shape, generator=g) for name, shape, _ in TENSORS}
    write_gguf(path, FIELDS, TENSORS, data.__getitem__)


def walk(blob: bytes) -> list[Field]:
    """Every header field of a valid GGUF file, found without the reader under test."""
    fields = [Field(4, 4, "version"), Field(8, 8, "count"), Field(16, 8, "count")]
    n_tensors, n_kv = struct.unpack_from("<QQ", blob, 8)
    pos = 24

    def string() -> None:
        nonlocal pos
        n = struct.unpack_from("<Q", blob, pos)[0]
        fields.extend([Field(pos, 8, "length"), Field(pos + 8, n, "string")])
        pos += 8 + n

    def scalar(kind: str, width: int) -> int:
        nonlocal pos
        fields.append(Field(pos, width, kind))
        pos += width
        return int.from_bytes(blob[pos - width:pos], "little")

    sizes = {V.UINT8: 1, V.INT8: 1, V.BOOL: 1, V.UINT16: 2, V.INT16: 2, V.UINT32: 4, V.INT32: 4, V.FLOAT32: 4,
             V.UINT64: 8, V.INT64: 8, V.FLOAT64: 8}
    for _ in range(n_kv):
        string()
        vtype = scalar("type", 4)
        if vtype == V.ARRAY:
            item, count = scalar("type", 4), scalar("count", 8)
            for _ in range(count):
                if item == V.STRING:
                    string()
                else:
                    pos += sizes[item]
        elif vtype == V.STRING:
            string()
        else:
            pos += sizes[vtype]
    for _ in range(n_tensors):
        string()
        for _ in range(scalar("count", 4)):
            scalar("dim", 8)
        scalar("type", 4)
        scalar("offset", 8)
    return fields


def truncate(blob: bytes, at: int) -> bytes:
    return blob[:at]


def overwrite(blob: bytes, field: Field, value: int) -> bytes:
    """`blob` with numeric `field` set to `value` (wrapped to its width, so -32 reads as 2^64-32)."""
    raw = (value % (1 << 8 * field.width)).to_bytes(field.width, "little")
    return blob[:field.offset] + raw + blob[field.offset + field.width:]


def mutate(blob: bytes, fields: list[Field], rng: random.Random) -> tuple[str, bytes]:
    """One random mutation of the seed: its kind and the mutated bytes."""
    numbers = [f for f in fields if f.kind != "string"]
    strings = [f for f in fields if f.kind == "string" and f.width]
    kind = rng.choice(["truncate-boundary", "truncate", "flip", "overwrite", "duplicate", "non-utf8", "wrong-type"])
    if kind == "truncate-boundary":
        f = rng.choice(fields)
        return kind, truncate(blob, rng.choice([f.offset, f.offset + f.width]) + rng.choice([-1, 0, 1]))
    if kind == "truncate":
        return kind, truncate(blob, rng.randrange(len(blob)))
    if kind == "flip":
        out = bytearray(blob)
        header_end = fields[-1].offset + fields[-1].width
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(header_end if rng.random() < 0.7 else len(blob))
            out[at] ^= 1 << rng.randrange(8)
        return kind, bytes(out)
    if kind == "overwrite":
        value = rng.choice([*INTERESTING, rng.getrandbits(64), -rng.randrange(1, 1 << 16)])
        return kind, overwrite(blob, rng.choice(numbers), value)
    if kind == "duplicate":
        a = rng.choice(strings)
        b = rng.choice([f for f in strings if f.width == a.width])
        return kind, blob[:b.offset] + blob[a.offset:a.offset + a.width] + blob[b.offset + b.width:]
    if kind == "non-utf8":
        f = rng.choice(strings)
        at = f.offset + rng.randrange(f.width)
        return kind, blob[:at] + bytes([rng.choice([0xFF, 0xC0, 0x80, 0xED])]) + blob[at + 1:]
    return kind, overwrite(blob, rng.choice([f for f in fields if f.kind == "type"]), rng.randrange(45))


def same(f: GGUFFile, tensors: dict[str, torch.Tensor], seed: GGUFFile, seed_tensors: dict[str, torch.Tensor]) -> bool:
    return (f.version, f.alignment, f.fields) == (seed.version, seed.alignment, seed.fields) and list(tensors) == list(
        seed_tensors) and all(torch.equal(tensors[n], seed_tensors[n]) for n in tensors)


class GGUFCase:
    """The seed, written once under `workdir`; calling it runs one mutated case and returns its outcome."""

    def __init__(self, workdir: Path) -> None:
        self.seed_path, self.case_path = workdir / "seed.gguf", workdir / "case.gguf"
        write_seed(self.seed_path)
        self.blob = self.seed_path.read_bytes()
        self.fields = walk(self.blob)
        self.seed = read_gguf(self.seed_path)
        self.seed_tensors = {n: self.seed.read(n) for n in self.seed.tensors}

    def __call__(self, rng: random.Random) -> str:
        kind, blob = mutate(self.blob, self.fields, rng)
        return f"{kind}: {self.check(blob, exact=kind.startswith('truncate'))}"

    def check(self, blob: bytes, exact: bool) -> str:
        """"rejected", "equal" or "changed"; AssertionError (or the reader's own exception) if the property fails."""
        self.case_path.write_bytes(blob)
        tracing = tracemalloc.is_tracing()
        if not tracing:
            tracemalloc.start()
        tracemalloc.reset_peak()
        base, start = tracemalloc.get_traced_memory()[0], time.perf_counter()
        try:
            f = read_gguf(self.case_path)
            tensors = {n: f.read(n) for n in f.tensors}
        except GGUFError:
            f = None
        finally:
            peak, elapsed = tracemalloc.get_traced_memory()[1] - base, time.perf_counter() - start
            if not tracing:
                tracemalloc.stop()
        assert peak < len(blob) + MIB, f"reading {len(blob)} bytes peaked at {peak} traced bytes"
        assert elapsed < 5, f"reading took {elapsed:.1f} s"
        if f is None:
            return "rejected"
        for name, info in f.tensors.items():
            assert tensors[name].shape == info.shape and tensors[name].dtype == torch.float32, name
        equal = same(f, tensors, self.seed, self.seed_tensors)
        assert equal or not exact, "a truncated file was read without error but differs from the seed"
        return "equal" if equal else "changed"
