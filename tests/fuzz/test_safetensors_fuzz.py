"""Fuzz the safetensors reader: mutated checkpoints read right or raise a QloraError.

    python -m pytest tests/fuzz/test_safetensors_fuzz.py -q

From a tiny valid checkpoint (safetensors.torch.save), mutate: truncate at section boundaries
or anywhere, flip bits, set the header length to 0 / 2^31 / 2^63, rewrite entries with
negative, overlapping or short offsets, wrong dtypes and shapes, duplicate names, non-UTF-8
bytes. The property, differential against the safetensors library: qlora returns exactly
what the library reads, or raises a QloraError (never another exception); it accepts nothing
the library rejects and rejects nothing it accepts (every seed dtype is one qlora reads);
the read allocates less than the file size + 1 MiB (tracemalloc peak).
"""
import json
import struct
import tempfile
import tracemalloc
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as reference_load
from safetensors.torch import save

from qlora.errors import QloraError
from qlora.model.checkpoint_files import read_tensors

SEED = save({
    "a": torch.arange(12, dtype=torch.float32).view(3, 4), "b": torch.ones(5, dtype=torch.bfloat16),
    "c": torch.tensor([7, -1], dtype=torch.int64), "d": torch.tensor([True, False]), "z": torch.zeros(0, 3),
}, metadata={"format": "pt"})
N = struct.unpack("<Q", SEED[:8])[0]
HEADER = json.loads(SEED[8: 8 + N])
BOUNDARIES = sorted({0, 8, 8 + N, len(SEED)} | {8 + N + o for k, v in HEADER.items() if k != "__metadata__"
                                                 for o in v["data_offsets"]})
_DIR = Path(tempfile.mkdtemp(prefix="qlora-fuzz-"))


def _with_header(header_text: bytes, data: bytes = SEED[8 + N:]) -> bytes:
    return struct.pack("<Q", len(header_text)) + header_text + data


def _edit_entry(draw) -> bytes:
    header = json.loads(SEED[8: 8 + N])
    name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "delete", "metadata"]))
    values = {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X", 3, None]),
        "shape": st.one_of(st.lists(st.integers(-2, 6), max_size=3), st.just("3"), st.just([2.0])),
        "data_offsets": st.one_of(st.lists(st.integers(-16, 200), min_size=0, max_size=3),
                                  st.tuples(st.integers(-16, 200), st.just(2**64))),
        "metadata": st.one_of(st.just({"format": 1}), st.just([]), st.just(None)),
    }
    if field == "delete":
        del header[name]
    elif field == "metadata":
        header["__metadata__"] = draw(values["metadata"])
    else:
        header[name][field] = draw(values[field])
    return json.dumps(header).encode()


@st.composite
def mutated(draw) -> bytes:
    kind = draw(st.sampled_from(["truncate_boundary", "truncate", "flip", "length", "entry", "duplicate", "utf8",
                                 "not_object"]))
    if kind == "truncate_boundary":
        cut = draw(st.sampled_from(BOUNDARIES)) + draw(st.integers(-1, 1))
        return SEED[: max(cut, 0)]
    if kind == "truncate":
        return SEED[: draw(st.integers(0, len(SEED)))]
    if kind == "flip":
        data = bytearray(SEED)
        for i in draw(st.lists(st.integers(0, len(SEED) * 8 - 1), min_size=1, max_size=8)):
            data[i // 8] ^= 1 << (i % 8)
        return bytes(data)
    if kind == "length":
        n = draw(st.sampled_from([0, 1, N - 1, N + 1, 2**31, 2**63, 2**64 - 1]))
        return struct.pack("<Q", n) + SEED[8:]
    if kind == "entry":
        return _with_header(_edit_entry(draw))
    if kind == "duplicate":  # the first entry repeated under its own name, in the JSON text
        text = SEED[8: 8 + N].decode().rstrip()
        first = text[1: text.index("}") + 1]
        return _with_header(("{" + first + "," + text[1:]).encode())
    if kind == "utf8":
        at = draw(st.integers(8, 8 + N - 1))
        return SEED[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + SEED[at + 1:]
    return _with_header(draw(st.sampled_from([b"[]", b"null", b"1", b'"x"', b"[" * 5000, b"{}", b" " * 8])))


def _raw(tensors: dict[str, torch.Tensor]) -> dict:
    return {k: (t.dtype, tuple(t.shape), bytes(t.reshape(-1).view(torch.uint8).numpy())) for k, t in tensors.items()}


def _read(path: Path) -> tuple[dict | QloraError, int]:
    tracemalloc.start()
    try:
        return _raw(dict(read_tensors(path))), tracemalloc.get_traced_memory()[1]
    except QloraError as e:
        return e, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_seed_reads_exactly():
    (_DIR / "seed.safetensors").write_bytes(SEED)
    assert _read(_DIR / "seed.safetensors")[0] == _raw(reference_load(SEED))


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_files_read_right_or_raise_a_qlora_error(data):
    path = _DIR / "m.safetensors"
    path.write_bytes(data)
    ours, peak = _read(path)
    try:
        reference = _raw(reference_load(data))
    except Exception as e:  # the library's SafetensorError, or what its Python wrapper raises
        reference = e
    assert peak < len(data) + (1 << 20)
    if isinstance(ours, QloraError):
        assert isinstance(reference, Exception), f"qlora rejects a file the library reads: {ours}"
        assert str(path) in str(ours)
    else:
        assert ours == reference
