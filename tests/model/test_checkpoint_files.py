"""Hostile weight files: safetensors headers, pickles with code, adapter configs, quant states.

    python -m pytest tests/model/test_checkpoint_files.py -q

Each bad file must end in a QloraError whose message names the file (and tensor or key).
"""
import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from qlora.errors import QloraError
from qlora.model.adapter import read_adapter
from qlora.model.checkpoint_files import CheckpointError, read_header, read_tensors, stream_tensors
from qlora.quant.tensor import QuantizedTensor, QuantStateError, quantize


def _write(path, header, data=b""):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def test_a_valid_file_reads_as_saved(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64),
               "empty": torch.zeros(0, 4, dtype=torch.bfloat16)}
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    got = dict(read_tensors(tmp_path / "m.safetensors"))
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("header, data, match", [
    ({"w": _entry(offsets=(-8, 0))}, b"\0" * 8, r"tensor 'w': data_offsets \[-8, 0\] is not \[begin, end\]"),
    ([1, 2], b"", "header .* is a JSON list, not an object"),
    ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, r"tensor 'w': expected \{dtype, shape, data_offsets\}"),
    ({"w": _entry(dtype="F8_E9")}, b"\0" * 8, "unsupported dtype 'F8_E9'"),
    ({"w": _entry(shape=(2, -1))}, b"\0" * 8, "not a list of non-negative ints"),
    ({"w": _entry(shape=(3,))}, b"\0" * 8, r"hold 8 bytes .* needs 12"),
    ({"a": _entry(), "b": _entry(offsets=(4, 12))}, b"\0" * 12, "tensor 'b' starts at file byte .* overlaps"),
    ({"a": _entry(), "b": _entry(offsets=(12, 20))}, b"\0" * 20, "tensor 'b' .* leaves a gap"),
    ({"w": _entry()}, b"\0" * 9, "1 bytes before the end of the file"),
    ({"w": _entry()}, b"\0" * 4, "tensor 'w' ends at byte .* truncated"),
    ({"__metadata__": {"format": 1}, "w": _entry()}, b"\0" * 8, "__metadata__ must map strings to strings"),
    (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "w": {}}', b"\0" * 8, "duplicate name 'w'"),
    (b'{"w": \xff}', b"", "unreadable safetensors header"),
    (b'{"w": [}', b"", r"unreadable safetensors header .* at byte 15"),
])
def test_bad_headers_are_checkpoint_errors(tmp_path, header, data, match):
    file = _write(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=match) as e:
        read_header(file)
    assert str(file) in str(e.value) and isinstance(e.value, QloraError)


@pytest.mark.parametrize("length", [0, 2**31, 2**63, 2**64 - 1])
def test_header_length_beyond_the_file(tmp_path, length):
    file = tmp_path / "m.safetensors"
    file.write_bytes(struct.pack("<Q", length) + b"{}")
    with pytest.raises(CheckpointError, match="bytes 0-7 give a header of|unreadable safetensors header"):
        read_header(file)


class _Code:
    def __reduce__(self):
        return (os.system, ("echo this should never run",))


def test_a_pickle_holding_code_is_refused_in_one_line(tmp_path):
    torch.save({"w": torch.zeros(2), "x": _Code()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        list(stream_tensors(tmp_path, allow_pickle=True, progress=False))
    message = str(e.value)
    assert "pytorch_model.bin" in message and "safetensors" in message and "\n" not in message
    assert "weights_only=False" not in message


def _adapter(tmp_path, config=None, tensors=None):
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], **(config or {})}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = tensors or {f"{key}.lora_A.weight": torch.zeros(2, 8), f"{key}.lora_B.weight": torch.zeros(8, 2)}
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    return tmp_path


@pytest.mark.parametrize("config, match", [
    ({"r": 0}, "r=0 is not an int >= 1"),
    ({"r": "8"}, "r='8' is not an int"),
    ({"r": True}, "r=True is not an int"),
    ({"lora_alpha": "16"}, "lora_alpha='16' is not a positive number"),
    ({"target_modules": [1, 2]}, "target_modules=.* is not a name"),
    ({"lora_dropout": 2}, "lora_dropout=2"),
    ({"rank_pattern": {"(": 4}}, "rank_pattern key '\\(' is not a valid regex"),
    ({"alpha_pattern": {"q": "x"}}, "alpha_pattern=.* numbers"),
])
def test_bad_adapter_configs(tmp_path, config, match):
    with pytest.raises(CheckpointError, match=match):
        read_adapter(_adapter(tmp_path, config))


def test_adapter_config_not_an_object_and_int_tensors(tmp_path):
    _adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("[1]")
    with pytest.raises(CheckpointError, match="adapter_config.json: a JSON list"):
        read_adapter(tmp_path)
    key = "base_model.model.m.lora_A.weight"
    with pytest.raises(CheckpointError, match=f"tensor '{key}' is torch.int64"):
        read_adapter(_adapter(tmp_path, tensors={key: torch.zeros(2, 8, dtype=torch.int64)}))


def _state(info: object) -> dict:
    sd = quantize(torch.randn(8, 64)).state_dict()
    blob = info if isinstance(info, bytes) else json.dumps(info).encode()
    sd["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(blob), dtype=torch.uint8)
    return sd


@pytest.mark.parametrize("change, match", [
    ({"blocksize": "64"}, "blocksize '64' is not a power of two"),
    ({"blocksize": 48}, "blocksize 48"),
    ({"shape": [8, "64"]}, "not a list of positive ints"),
    ({"shape": [8, 32]}, r"weight: expected 128 elements"),
    ({"quant_type": "nf5"}, "unknown quant_type 'nf5'"),
    ({"nested_offset": "x"}, "nested_offset 'x'"),
    ({"nested_blocksize": 128}, "nested_blocksize 128"),
])
def test_bad_quant_states(change, match):
    info = json.loads(bytes(quantize(torch.randn(8, 64)).state_dict()["weight.quant_state.bitsandbytes__nf4"].tolist()))
    with pytest.raises(QuantStateError, match=match):
        QuantizedTensor.from_state_dict(_state({**info, **change}))


@pytest.mark.parametrize("blob, match", [(b"[1]", "a JSON list, not an object"), (b"\xff{}", "not a UTF-8 JSON")])
def test_quant_state_not_a_json_object(blob, match):
    with pytest.raises(QuantStateError, match=match):
        QuantizedTensor.from_state_dict(_state(blob))
