"""Native kernels (AVX2 and scalar) against the pure-PyTorch reference, bit for bit."""
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qlora
from qlora import kernels
from qlora.quant import blockwise
from qlora.kernels import cpu


def test_native_library_builds_here():
    assert cpu.load() is not None, cpu.error()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings from /proc (Linux)")
def test_the_kernels_share_torchs_openmp_runtime():
    """Built with OpenMP, the library binds to the libgomp torch loaded: one OpenMP runtime, one
    thread pool (two would fight over the cores)."""
    assert cpu.load() is not None, cpu.error()
    with open("/proc/self/maps") as f:
        gomp = {line.split()[-1] for line in f if "libgomp" in line}
    assert len(gomp) == 1, gomp


def test_the_pthread_build_decodes_and_drops_like_the_reference():
    """The fallback where -fopenmp does not build: the same results on pthreads (and two threads
    on the OpenMP build)."""
    import ctypes

    from qlora.nn.dropout import seeded_dropout_ref, threshold_and_scale

    lib = cpu.declare(ctypes.CDLL(str(cpu.build(cpu.FLAGS))))
    qt = qlora.quantize(torch.randn(2 * 65536 + 300 * 64 + 17), "nf4", 64, True)  # 2 threads' worth (the grain)
    want = blockwise.dequantize_4bit_ref(qt.data, qt.scales(), qt.code, 64, qt.numel(), torch.bfloat16)
    for library in (lib, cpu.load()):  # pthreads, and the OpenMP build the kernels use
        out = torch.empty(qt.numel(), dtype=torch.bfloat16)
        library.qlora_decode_4bit(qt.data.data_ptr(), None, qt.absmax.data_ptr(), qt.nested_absmax.data_ptr(),
                                  qt.nested_code.data_ptr(), float(qt.nested_offset), qt.code.data_ptr(),
                                  out.data_ptr(), qt.numel(), 64, 2, 2, int(kernels.has_simd()), 0)
        assert torch.equal(out, want)
    x = torch.randn(3 * 65536 + 5, dtype=torch.bfloat16)
    dropped = torch.empty_like(x)
    threshold, scale = threshold_and_scale(0.1)
    seed = torch.tensor(12345)  # the kernel reads the seed through a pointer
    lib.qlora_dropout2(x.data_ptr(), dropped.data_ptr(), None, None, x.numel(), 2, seed.data_ptr(), threshold, scale,
                       0.0, 2, int(kernels.has_simd()))
    assert torch.equal(dropped, seeded_dropout_ref(x, 0.1, 12345))


@pytest.fixture(params=["native", "scalar"])
def mode(request, monkeypatch):
    monkeypatch.setenv("QLORA_KERNELS", request.param)
    qlora.kernels.reread_mode()
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


@pytest.mark.parametrize("double_quant", [True, False])
def test_a_kept_decode_follows_every_tensor_of_the_weight(double_quant):
    """The C decode keeps its checked arguments (raw pointers) on the weight: replacing any tensor
    the kernel reads, or changing the code book in place, decodes the new values, never freed ones."""
    qt = qlora.quantize(torch.randn(300 * 64 + 10), "nf4", 64, double_quant)
    out = torch.empty(qt.numel(), dtype=torch.bfloat16)

    def decoded() -> bool:
        out.fill_(float("nan"))
        assert kernels.decode_4bit(qt, out)
        return torch.equal(out, blockwise.dequantize_4bit_ref(qt.data, qt.scales(), qt.code, 64, qt.numel(),
                                                              torch.bfloat16))

    assert decoded() and decoded()
    qt.code = qt.code * 2  # the old code book is freed unless something keeps it
    assert decoded()
    qt.code[3] = 0.25  # in place
    assert decoded()
    if double_quant:
        qt.nested_absmax = qt.nested_absmax * 2
        assert decoded()
        qt.nested_code = qt.nested_code.flip(0).contiguous()
    else:
        qt.absmax = qt.absmax * 2
    assert decoded()
    qt.data = qt.data.flip(0).contiguous()
    assert decoded()


def test_denormal_and_extreme_scales_are_exact():
    x = torch.tensor([1e-40, -3e-39, 2e-39, 0.0] * 16 + [3e38, -1e38] * 32)
    qt = qlora.quantize(x, double_quant=False)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ref = blockwise.dequantize_4bit_ref(qt.data, qt.absmax, qt.code, 64, x.numel(), dtype)
        assert torch.equal(qt.dequantize(dtype), ref)


def test_reference_mode_and_bad_mode(monkeypatch):
    monkeypatch.setenv("QLORA_KERNELS", "reference")
    qlora.kernels.reread_mode()
    out = torch.empty(10, 64)
    assert kernels.decode_4bit(qlora.quantize(torch.randn(10, 64)), out) is False
    monkeypatch.setenv("QLORA_KERNELS", "fast")
    qlora.kernels.reread_mode()
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
    qlora.kernels.reread_mode()
    x = torch.randn(5, 64)
    x[3, 7] = float("-inf")
    with pytest.raises(ValueError, match=r"1 NaN/Inf value\(s\), first at index \[3, 7\]"):
        qlora.quantize(x)


def test_missing_triton_on_a_triton_device_warns_once(monkeypatch):
    """A CUDA machine without triton would silently run the slow reference decode and dropout:
    one warning says so (here the CPU stands in for the Triton device)."""
    import warnings

    from qlora.nn.dropout import seeded_dropout, seeded_dropout_ref

    monkeypatch.setattr(kernels, "TRITON_DEVICE_TYPES", {"cpu"})
    monkeypatch.setattr(kernels, "_triton_error", "ModuleNotFoundError: No module named 'triton'")
    monkeypatch.setattr(kernels, "_triton_warned", False)
    qt, x = qlora.quantize(torch.randn(20, 64)), torch.randn(8, 64)
    with pytest.warns(UserWarning, match="triton does not import .*No module named 'triton'.*reference"):
        w = qt.dequantize()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(seeded_dropout(x, 0.1, 5), seeded_dropout_ref(x, 0.1, 5))  # no second warning
    assert torch.equal(w, blockwise.dequantize_4bit_ref(qt.data, qt.scales(), qt.code, qt.blocksize, qt.numel(),
                                                        torch.float32).view(20, 64))
    monkeypatch.setattr(kernels, "_triton_warned", False)
    monkeypatch.setenv("QLORA_KERNELS", "reference")  # asked for: no warning
    kernels.reread_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qt.dequantize()
