"""QuantizedTensor: shapes, out=, serialized layout (vs bitsandbytes), accounting, bad input."""
import json

import bitsandbytes.functional as bnbF
import pytest
import torch

import qlora
from qlora import QuantizedTensor


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 33), (128, 96), (1, 1)])
def test_any_shape_roundtrips(shape):
    x = torch.randn(shape)
    qt = qlora.quantize(x)
    y = qt.dequantize()
    assert y.shape == x.shape and y.dtype == x.dtype
    assert (y - x).norm() / x.norm() < 0.2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_default_output_dtype_is_the_input_dtype(dtype):
    assert qlora.quantize(torch.randn(10, 64).to(dtype)).dequantize().dtype == dtype


def test_dequantize_into_out_reuses_the_buffer():
    qt = qlora.quantize(torch.randn(64, 96))
    out = torch.empty(64, 96, dtype=torch.bfloat16)
    y = qt.dequantize(out=out)
    assert y.data_ptr() == out.data_ptr()
    assert torch.equal(y, qt.dequantize(torch.bfloat16))
    flat = torch.empty(64 * 96, dtype=torch.float16)  # any contiguous buffer of the right size
    assert qt.dequantize(out=flat).shape == (64, 96)


def test_out_errors():
    qt = qlora.quantize(torch.randn(8, 64))
    with pytest.raises(ValueError, match="contiguous"):
        qt.dequantize(out=torch.empty(8, 63))
    with pytest.raises(TypeError, match="int32"):
        qt.dequantize(out=torch.empty(8, 64, dtype=torch.int32))
    with pytest.raises(TypeError, match="disagrees"):
        qt.dequantize(torch.float16, out=torch.empty(8, 64))


def test_bits_per_param():
    w = torch.randn(4096, 1024)
    assert qlora.quantize(w, double_quant=True).bits_per_param == pytest.approx(4.127, abs=1e-3)
    assert qlora.quantize(w, double_quant=False).bits_per_param == pytest.approx(4.5, abs=1e-6)
    assert qlora.quantize(w, double_quant=False).nbytes == 4096 * 1024 // 2 + 4096 * 1024 // 64 * 4


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_state_dict_is_bitsandbytes_layout(quant_type, double_quant):
    w = torch.randn(48, 80, dtype=torch.bfloat16)
    sd = qlora.quantize(w, quant_type, 64, double_quant).state_dict("weight")
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    theirs = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    assert sorted(sd) == sorted(theirs)
    for key in sd:
        assert sd[key].dtype == theirs[key].dtype and sd[key].shape == theirs[key].shape, key
        assert torch.equal(sd[key], theirs[key]), key
    blob = json.loads(bytes(sd[f"weight.quant_state.bitsandbytes__{quant_type}"].tolist()))
    assert list(blob)[:4] == ["quant_type", "blocksize", "dtype", "shape"]
    assert blob["dtype"] == "bfloat16" and blob["shape"] == [48, 80]


@pytest.mark.parametrize("double_quant", [True, False])
def test_reads_bitsandbytes_state(double_quant):
    w = torch.randn(40, 64)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    sd = {"w": packed, **{f"w.{k}": v for k, v in state.as_dict(packed=True).items()}}
    qt = QuantizedTensor.from_state_dict(sd, prefix="w")
    assert torch.equal(qt.dequantize(), bnbF.dequantize_4bit(packed, state))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_state_dict_roundtrip(quant_type):
    qt = qlora.quantize(torch.randn(33, 65), quant_type)
    back = QuantizedTensor.from_state_dict(qt.state_dict("layer.weight"), "layer.weight")
    assert torch.equal(back.dequantize(), qt.dequantize()) and back.shape == qt.shape


def test_quant_storage_bytes_are_reinterpreted():
    qt = qlora.quantize(torch.randn(16, 64))
    sd = qt.state_dict()
    sd["weight"] = sd["weight"].view(-1).view(torch.bfloat16).view(-1, 1)  # quant_storage=bf16
    assert torch.equal(QuantizedTensor.from_state_dict(sd).dequantize(), qt.dequantize())


def _sd():
    return qlora.quantize(torch.randn(16, 64)).state_dict()


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda sd: sd.pop("weight.absmax"), "missing tensor 'weight.absmax'"),
        (lambda sd: sd.pop("weight.quant_state.bitsandbytes__nf4"), "quant_state"),
        (lambda sd: sd.update({"weight": sd["weight"][:-1]}), "weight: expected 512 elements"),
        (lambda sd: sd.update({"weight.nested_absmax": torch.zeros(3)}), "nested_absmax: expected 1"),
        (lambda sd: sd.update({"weight.quant_state.bitsandbytes__nf4": torch.tensor(list(b'{"quant_type": "nf3"}'), dtype=torch.uint8)}), "nf3"),
        (lambda sd: sd.update({"weight.quant_state.bitsandbytes__nf4": torch.tensor([255, 0], dtype=torch.uint8)}), "JSON"),
        (lambda sd: sd.update({"weight.absmax": sd["weight.absmax"].float()}), "must be uint8"),
    ],
)
def test_inconsistent_state_is_a_clear_error(mutate, match):
    sd = _sd()
    mutate(sd)
    with pytest.raises(ValueError, match=match):
        QuantizedTensor.from_state_dict(sd)


@pytest.mark.parametrize(
    "tensor, kwargs, error, match",
    [
        (torch.tensor([1.0, float("nan"), 2.0]), {}, ValueError, r"NaN/Inf.*index \[1\]"),
        (torch.tensor([[1.0, float("inf")]]), {}, ValueError, "NaN/Inf"),
        (torch.arange(64), {}, TypeError, "torch.int64"),
        (torch.randn(64, dtype=torch.float64), {}, TypeError, "float64"),
        (torch.randn(64), {"blocksize": 48}, ValueError, "blocksize 48"),
        (torch.randn(64), {"blocksize": 8192}, ValueError, "blocksize 8192"),
        (torch.randn(64), {"quant_type": "nf3"}, ValueError, "nf3"),
        (torch.empty(0, 5), {}, ValueError, "empty"),
    ],
)
def test_bad_input_is_a_clear_error(tensor, kwargs, error, match):
    with pytest.raises(error, match=match):
        qlora.quantize(tensor, **kwargs)


def test_non_tensor_input():
    with pytest.raises(TypeError, match="list"):
        qlora.quantize([1.0, 2.0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    """The same codes; the DQ offset is a float32 mean summed in the device's order (as in
    bitsandbytes), so it and the nested scales may differ in the last bit (seen on an H200)."""
    x = torch.randn(300, 70)
    cpu, gpu = qlora.quantize(x), qlora.quantize(x.cuda())
    assert torch.equal(gpu.data.cpu(), cpu.data) and torch.equal(gpu.absmax.cpu(), cpu.absmax)
    assert abs(gpu.nested_offset - cpu.nested_offset) <= 1e-6 * abs(cpu.nested_offset)
    torch.testing.assert_close(gpu.dequantize().cpu(), cpu.dequantize(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [1, 255, 256, 257, 3 * 256 + 63])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_reference_quantizes_in_chunks_exactly(monkeypatch, n, blocksize):
    """Where the C kernel is not used, the reference runs a chunk at a time (bounded temporaries):
    the codes and scales equal one whole-tensor quantize_4bit_ref, across chunk, block and odd-length edges."""
    from qlora.quant import tensor as tensor_module
    from qlora.quant.blockwise import quantize_4bit_ref

    monkeypatch.setenv("QLORA_KERNELS", "reference")
    qlora.kernels.reread_mode()
    monkeypatch.setattr(tensor_module, "REFERENCE_CHUNK", 128)
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3
    qt = qlora.quantize(x, "nf4", blocksize, double_quant=False)
    want_packed, want_absmax = quantize_4bit_ref(x, qlora.NF4, blocksize)
    assert torch.equal(qt.data.view(-1), want_packed) and torch.equal(qt.absmax, want_absmax)
