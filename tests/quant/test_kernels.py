"""Native kernels (AVX2 and scalar) against the pure-PyTorch reference, bit for bit."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qlora
from qlora.quant import blockwise, kernels
from qlora.quant.kernels import cpu


def test_native_library_builds_here():
    assert cpu.load() is not None, cpu.error()


@pytest.fixture(params=["native", "scalar"])
def mode(request, monkeypatch):
    monkeypatch.setenv("QLORA_KERNELS", request.param)
    return request.param


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 9000),
    blocksize=st.sampled_from([32, 64, 128, 4096]),
    quant_type=st.sampled_from(["nf4", "fp4", "int4"]),
    double_quant=st.booleans(),
    in_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    out_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**31),
)
def test_native_matches_reference(mode, n, blocksize, quant_type, double_quant, in_dtype, out_dtype, seed):
    x = (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3).to(in_dtype)
    qt = qlora.quantize(x, quant_type, blocksize, double_quant)
    packed, absmax = blockwise.quantize_4bit_ref(x, qt.code, blocksize)
    assert torch.equal(qt.data.view(-1), packed)
    if not double_quant:
        assert torch.equal(qt.absmax, absmax)
    expected = blockwise.dequantize_4bit_ref(qt.data, qt.scales(), qt.code, blocksize, n, out_dtype)
    assert torch.equal(qt.dequantize(out_dtype).view(-1), expected)


def test_streaming_stores_path_is_exact(monkeypatch):
    monkeypatch.setattr(kernels, "STREAM_BYTES", 0)  # force non-temporal stores on a small tensor
    qt = qlora.quantize(torch.randn(256, 192))
    expected = blockwise.dequantize_4bit_ref(qt.data, qt.scales(), qt.code, 64, qt.numel(), torch.bfloat16)
    assert torch.equal(qt.dequantize(torch.bfloat16).view(-1), expected)


def test_denormal_and_extreme_scales_are_exact():
    x = torch.tensor([1e-40, -3e-39, 2e-39, 0.0] * 16 + [3e38, -1e38] * 32)
    qt = qlora.quantize(x, double_quant=False)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ref = blockwise.dequantize_4bit_ref(qt.data, qt.absmax, qt.code, 64, x.numel(), dtype)
        assert torch.equal(qt.dequantize(dtype), ref)


def test_reference_mode_and_bad_mode(monkeypatch):
    monkeypatch.setenv("QLORA_KERNELS", "reference")
    out = torch.empty(10, 64)
    assert kernels.decode_4bit(qlora.quantize(torch.randn(10, 64)), out) is False
    monkeypatch.setenv("QLORA_KERNELS", "fast")
    with pytest.raises(ValueError, match="QLORA_KERNELS"):
        qlora.quantize(torch.randn(64))


def test_missing_compiler_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_error", None)
    monkeypatch.setattr(kernels, "_warned", False)
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    x = torch.randn(20, 64)
    with pytest.warns(UserWarning, match="native CPU kernels unavailable"):
        y = qlora.quantize(x).dequantize()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z = qlora.quantize(x).dequantize()  # no second warning
    assert torch.equal(y, z)


@pytest.mark.parametrize("mode_name", ["native", "scalar", "reference"])
def test_nonfinite_rejected_on_every_path(monkeypatch, mode_name):
    monkeypatch.setenv("QLORA_KERNELS", mode_name)
    x = torch.randn(5, 64)
    x[3, 7] = float("-inf")
    with pytest.raises(ValueError, match=r"1 NaN/Inf value\(s\), first at index \[3, 7\]"):
        qlora.quantize(x)
