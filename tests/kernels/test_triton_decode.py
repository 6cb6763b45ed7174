"""Triton decode (qlora/kernels/triton_decode.py) under Triton's CPU interpreter,
bit for bit against the pure-PyTorch reference (blockwise.py): NF4 / FP4 / INT4, with and
without double quantization, blocksizes 32 to 4096, odd sizes, bf16 / fp16 / fp32 out.

    TRITON_INTERPRET=1 is set below before triton is imported; `pytest -k triton` selects these.
"""
import importlib
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: build the kernels for the interpreter

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install 'qlora[dev]' on Linux x86-64)")

import qlora  # noqa: E402
from qlora import kernels  # noqa: E402
from qlora.quant import blockwise  # noqa: E402
from qlora.kernels import triton_decode  # noqa: E402

if not triton_decode.INTERPRET:  # imported earlier in this process without the interpreter
    triton_decode = importlib.reload(triton_decode)


def reference(qt, dtype):
    return blockwise.dequantize_4bit_ref(qt.data, qt.scales(), qt.code, qt.blocksize, qt.numel(), dtype)


def test_triton_kernels_run_in_the_interpreter_on_cpu_tensors():
    import triton.language.standard as tl_standard
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(tl_standard.cdiv, InterpretedFunction), (
        "triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it first)")

    assert triton_decode.INTERPRET
    assert isinstance(triton_decode._decode_kernel, InterpretedFunction)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
def test_triton_decode_is_bit_exact(quant_type, double_quant, blocksize):
    g = torch.Generator().manual_seed(blocksize)
    # odd numel, a partial last block, more than one program (DECODE_BYTES), > 256 blocks for DQ
    n = 2 * triton_decode.DECODE_BYTES + 3 * blocksize + 77 if blocksize < 4096 else 3 * 4096 + 5
    if double_quant and blocksize == 32:
        n = 256 * 32 + 999  # two nested blocks, the second partial
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(4) * 5
    qt = qlora.quantize(x, quant_type, blocksize, double_quant)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        out = torch.full((n,), float("nan"), dtype=dtype)
        triton_decode.decode_4bit(qt, out)
        assert torch.equal(out, reference(qt, dtype)), (dtype, int((out != reference(qt, dtype)).sum()))


def test_triton_decode_launch_settings_change_nothing_but_the_launch():
    """benchmarks/gpu.py sweeps bytes per program and warps: every setting decodes bit for bit."""
    qt = qlora.quantize(torch.randn(5 * 1024 + 77), "nf4", 64, True)
    want = reference(qt, torch.bfloat16)
    for nbytes, warps in ((64, 1), (512, 4), (4096, 8), (8192, 16)):
        out = torch.full((qt.numel(),), float("nan"), dtype=torch.bfloat16)
        triton_decode.decode_4bit(qt, out, bytes_per_program=nbytes, num_warps=warps)
        assert torch.equal(out, want), (nbytes, warps)
    with pytest.raises(ValueError, match="power of two >= 64"):
        triton_decode.decode_4bit(qt, out, bytes_per_program=96)


def test_triton_decode_full_programs_take_the_unmasked_path(monkeypatch):
    """Sizes that fill every program decode without masks (EVEN); both paths are bit-exact."""
    kernel, seen = triton_decode._decode_kernel, []

    class Spy:
        def __getitem__(self, grid):
            return lambda *args, **kw: seen.append(kw["EVEN"]) or kernel[grid](*args, **kw)

    monkeypatch.setattr(triton_decode, "_decode_kernel", Spy())
    for n in (3 * 2 * triton_decode.DECODE_BYTES, 3 * 2 * triton_decode.DECODE_BYTES - 2):
        for quant_type, double_quant in (("nf4", True), ("fp4", False)):
            qt = qlora.quantize(torch.randn(n), quant_type, 64, double_quant)
            for dtype in (torch.bfloat16, torch.float32):
                out = torch.full((n,), float("nan"), dtype=dtype)
                triton_decode.decode_4bit(qt, out)
                assert torch.equal(out, reference(qt, dtype)), (n, quant_type, dtype)
    assert seen == [True] * 4 + [False] * 4


def test_triton_code_pairs_table():
    """Byte b -> (code[b >> 4], code[b & 15]) as two float32 in one int64 (the high nibble's in the
    low half, as the kernels read it); rebuilt when the code book changes in place."""
    for quant_type in ("nf4", "fp4", "int4"):
        code = qlora.quantize(torch.randn(64), quant_type).code.clone()
        pairs = triton_decode.code_pairs(code)
        assert pairs.dtype == torch.int64 and pairs.shape == (256,)
        as_floats = pairs.view(torch.float32).view(256, 2)
        byte = torch.arange(256)
        assert torch.equal(as_floats[:, 0], code[byte >> 4]) and torch.equal(as_floats[:, 1], code[byte & 15])
        assert triton_decode.code_pairs(code) is pairs  # cached
        code[3] = 0.25
        assert triton_decode.code_pairs(code).view(torch.float32)[2 * 0x35] == 0.25  # byte 0x35: high nibble 3


def test_triton_bf16_rounding_ties_go_to_even():
    # x = absmax decodes as code 15 (1.0) * absmax = absmax: pick absmax halfway between two bf16 values
    bits = [0x3F808000, 0x3F818000, 0xBF808000 - 2**32, 0x3F80FFFF]  # the third is negative
    halfway = torch.tensor(bits, dtype=torch.int32).view(torch.float32)
    x = torch.zeros(4, 64)
    x[:, 0] = halfway
    qt = qlora.quantize(x.reshape(-1), "nf4", 64, double_quant=False)
    out = torch.empty(256, dtype=torch.bfloat16)
    triton_decode.decode_4bit(qt, out)
    expected = reference(qt, torch.bfloat16)
    assert torch.equal(out, expected)
    assert out[0].item() == 1.0 and out[64].item() == 1.015625  # even mantissa below / above


def test_triton_block_scales_match_the_reference_scales():
    qt = qlora.quantize(torch.randn(300 * 64 + 10), "nf4", 64, double_quant=True)
    assert torch.equal(triton_decode.block_scales(qt), qt.scales())
    plain = qlora.quantize(torch.randn(1000), "nf4", 64, double_quant=False)
    assert triton_decode.block_scales(plain) is plain.absmax


def test_triton_decode_through_the_dispatch(monkeypatch):
    """kernels.decode_4bit routes the devices in TRITON_DEVICE_TYPES (here: the CPU) to Triton."""
    monkeypatch.setattr(kernels, "TRITON_DEVICE_TYPES", {"cpu"})
    calls = []
    monkeypatch.setattr(triton_decode, "decode_4bit", lambda qt, out, f=triton_decode.decode_4bit: calls.append(1) or f(qt, out))
    qt = qlora.quantize(torch.randn(33, 64, dtype=torch.bfloat16))
    w = qt.dequantize(torch.bfloat16)
    assert calls == [1]
    assert torch.equal(w.view(-1), reference(qt, torch.bfloat16))


def test_triton_decode_works_out_its_launch_once_per_weight_and_workspace(monkeypatch):
    """A layer decodes into the same workspace every call: the checks and the launch's arguments
    are worked out once and kept on the weight, and again when the workspace, any of the
    weight's tensors or its code book change; every call bit for bit the reference."""
    checks = []
    real = triton_decode.check
    monkeypatch.setattr(triton_decode, "check", lambda qt, what: checks.append(what) or real(qt, what))
    qt = qlora.quantize(torch.randn(3 * 1024 + 64), "nf4", 64, True)
    out = torch.empty(qt.numel(), dtype=torch.bfloat16)

    def decoded(into):
        into.fill_(float("nan"))
        triton_decode.decode_4bit(qt, into)
        return torch.equal(into, reference(qt, into.dtype))

    assert all(decoded(out) for _ in range(3)) and len(checks) == 1
    qt.code = qt.code.clone()  # another code book tensor (the same values)
    assert decoded(out) and len(checks) == 2
    qt.code[15] = 0.5  # changed in place: new pairs
    assert decoded(out) and len(checks) == 3
    assert decoded(torch.empty(qt.numel(), dtype=torch.float32)) and len(checks) == 4  # another workspace
    assert decoded(out) and len(checks) == 5
    qt.nested_absmax = qt.nested_absmax * 2  # any other tensor the kernel reads
    assert decoded(out) and len(checks) == 6
    qt.absmax = qt.absmax.flip(0).contiguous()
    assert decoded(out) and len(checks) == 7
    qt.code = qt.code.double()  # a bad code book set on the same weight still fails its check
    with pytest.raises(ValueError, match="code must be 16 float32"):
        triton_decode.decode_4bit(qt, out)


def test_triton_decode_errors_name_the_tensor():
    qt = qlora.quantize(torch.randn(64))
    with pytest.raises(ValueError, match="out has 32 elements"):
        triton_decode.decode_4bit(qt, torch.empty(32))
    with pytest.raises(ValueError, match="contiguous float32/float16/bfloat16"):
        triton_decode.decode_4bit(qt, torch.empty(64, dtype=torch.int32))
    qt.code = qt.code.double()
    with pytest.raises(ValueError, match="code must be 16 float32"):
        triton_decode.decode_4bit(qt, torch.empty(64))


def test_triton_launches_enter_their_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device, not the tensors': every launcher enters its
    tensors' device first (else a model on cuda:1, current device cuda:0, would fault), where
    the process sees more than one device."""
    import contextlib
    import types

    from qlora.kernels import triton_dropout, triton_matmul

    on_gpu = types.SimpleNamespace(device=torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert isinstance(triton_decode.on_device(on_gpu), contextlib.nullcontext)  # one device: the current one
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    ctx = triton_decode.on_device(types.SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1  # built without touching CUDA
    monkeypatch.undo()
    entered = []
    real = triton_decode.on_device

    @contextlib.contextmanager
    def spy(t):
        entered.append(t)
        with real(t):
            yield

    monkeypatch.setattr(triton_decode, "on_device", spy)
    qt = qlora.quantize(torch.randn(32, 64), "nf4", 64, True)
    out = torch.empty(qt.numel(), dtype=torch.bfloat16)
    triton_decode.decode_4bit(qt, out)
    scales = triton_decode.block_scales(qt)
    x, dropped = torch.randn(16, 64, dtype=torch.bfloat16), torch.empty(16, 64, dtype=torch.bfloat16)
    triton_dropout.seeded_dropout(x, dropped, 3277, 1 / 0.95, 7)
    triton_matmul.linear_4bit(x, qt, scales)
    dy = torch.randn(16, 32, dtype=torch.bfloat16)
    triton_matmul.linear_4bit_t(dy, qt, scales)
    assert [id(t) for t in entered] == [id(out), id(scales), id(x), id(x), id(dy)]


def test_to_bf16_rounds_to_nearest_even_and_keeps_nan():
    """A GPU's float32 NaN is 0x7FFFFFFF: rounding its bits as a number would carry into -0.0."""
    import triton
    import triton.language as tl

    @triton.jit
    def _cast(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, triton_decode.to_bf16(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)

    bits = torch.tensor([0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0x7F800001, 0x7F800000, 0x3F808000, 0x3F818000,
                         0x3F807FFF, 0x00000001, 0x80000000], dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    out = torch.empty(len(x), dtype=torch.bfloat16)
    _cast[(1,)](x, out, len(x), BLOCK=16)
    assert out[:4].isnan().all()  # every NaN stays NaN, the GPU's canonical one included
    assert torch.equal(out[4:], x[4:].to(torch.bfloat16))  # torch's round to nearest even
