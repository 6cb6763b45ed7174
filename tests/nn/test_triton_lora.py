"""The fused Linear4bit + LoRA path (qlora/nn/fused_lora.py, kernels/triton_matmul.py) under
Triton's CPU interpreter: kernels and the autograd Function against dense float32 math on
the decoded weight, the LoraLinear reference path, what backward saves, and when the path
is selected.

Tolerance, element by element, with u the unit roundoff of the compute dtype (2^-8 bf16,
2^-11 fp16, 2^-24 fp32): the fused kernels multiply exactly dequant(W) with float32
accumulation and round once, so against float32 math on the same rounded inputs
|err| <= u |ref| + u |terms rounded on their own| + 1e-5 sum|products| (the last for the
float32 summation order). Against the PyTorch path, which rounds the base product and the
LoRA term separately: |err| <= 3u (|ref| + max|ref|).

    TRITON_INTERPRET=1 is set below before triton is imported; `pytest -k triton` selects these.
"""
import importlib
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: build the kernels for the interpreter

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install 'qlora[dev]' on Linux x86-64)")

import qlora  # noqa: E402
from qlora import Linear4bit, LoraLinear  # noqa: E402
from qlora.nn import fused_lora  # noqa: E402
from qlora.nn.dropout import new_seed, seeded_dropout  # noqa: E402
from qlora.quant import blockwise  # noqa: E402
from qlora.kernels import triton_decode, triton_matmul  # noqa: E402

if not (triton_decode.INTERPRET and triton_matmul.INTERPRET):  # imported earlier without the interpreter
    triton_decode = importlib.reload(triton_decode)
    triton_matmul = importlib.reload(triton_matmul)

M, N, K, R = 37, 50, 84, 5  # no dimension a multiple of the 16/16/32 interpreter tile; K % 64 != 0: blocks cross rows


def decoded(qt, dtype):
    return blockwise.dequantize_4bit_ref(qt.data, qt.scales(), qt.code, qt.blocksize, qt.numel(), dtype).view(qt.shape)


UNIT = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2**-24}


def assert_close(actual, expected, dtype, magnitude, rounded=0.0):
    """Element-wise: |actual - expected| <= u |expected| + u rounded + 1e-5 magnitude (module docstring)."""
    u = UNIT[dtype]
    tol = u * expected.abs() + u * rounded + 1e-5 * magnitude
    ratio = ((actual.float() - expected).abs() / tol).max().item()
    assert ratio <= 1, f"error reaches {ratio:.3g} x the tolerance"


def mm(a, b):
    return a.float() @ b.float()


def test_triton_matmul_kernels_run_in_the_interpreter():
    import triton.language.standard as tl_standard
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(tl_standard.cdiv, InterpretedFunction), (
        "triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it first)")

    assert triton_matmul.INTERPRET
    assert isinstance(triton_matmul._fwd_kernel.fn, InterpretedFunction)
    assert isinstance(triton_matmul._bwd_kernel.fn, InterpretedFunction)


@pytest.mark.parametrize("quant_type,double_quant,dtype,K", [
    ("nf4", True, torch.bfloat16, K), ("nf4", False, torch.float16, K), ("fp4", True, torch.float32, K),
    ("nf4", True, torch.bfloat16, 128),  # K % blocksize == 0: one scale per tile row
])
def test_triton_fused_kernels_match_dense_math(quant_type, double_quant, dtype, K):
    g = torch.Generator().manual_seed(1)
    qt = qlora.quantize(torch.randn(N, K, generator=g), quant_type, 64, double_quant)
    w = decoded(qt, dtype).float()  # the exact weight the kernel multiplies
    x = torch.randn(M, K, generator=g).to(dtype)
    xa, b = torch.randn(M, R, generator=g).to(dtype), torch.randn(N, R, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    scales = triton_decode.block_scales(qt)
    y = triton_matmul.linear_4bit(x, qt, scales, xa, b, 0.5, bias)
    assert y.dtype == dtype and y.shape == (M, N)
    mag = mm(x.abs(), w.abs().t()) + 0.5 * mm(xa.abs(), b.abs().t()) + bias.float().abs()
    assert_close(y, mm(x, w.t()) + 0.5 * mm(xa, b.t()) + bias.float(), dtype, mag)
    assert_close(triton_matmul.linear_4bit(x, qt, scales), mm(x, w.t()), dtype, mm(x.abs(), w.abs().t()))  # bare

    dy, a = torch.randn(M, N, generator=g).to(dtype), torch.randn(R, K, generator=g).to(dtype)
    gb = torch.randn(M, R, generator=g).to(dtype)
    dx = triton_matmul.linear_4bit_t(dy, qt, scales, gb, a, 2.0, out_dtype=torch.float32)
    assert dx.dtype == torch.float32 and dx.shape == (M, K)
    mag = mm(dy.abs(), w.abs()) + 2.0 * mm(gb.abs(), a.abs())
    assert_close(dx, mm(dy, w) + 2.0 * mm(gb, a), torch.float32, mag)  # fp32 out: no final bf16 rounding
    assert_close(triton_matmul.linear_4bit_t(dy, qt, scales), mm(dy, w), dtype, mm(dy.abs(), w.abs()))


def test_triton_kernel_errors_name_the_tensor():
    qt = qlora.quantize(torch.randn(N, K))
    scales = triton_decode.block_scales(qt)
    with pytest.raises(ValueError, match=r"linear_4bit x: .*shape \(3, 84\)"):
        triton_matmul.linear_4bit(torch.randn(3, K + 2), qt, scales)
    with pytest.raises(ValueError, match="even number of columns"):
        odd = qlora.quantize(torch.randn(4, 33))
        triton_matmul.linear_4bit(torch.randn(3, 33), odd, triton_decode.block_scales(odd))
    with pytest.raises(ValueError, match="linear_4bit_t lora_w"):
        triton_matmul.linear_4bit_t(torch.randn(3, N), qt, scales, torch.randn(3, R), torch.randn(R + 1, K))


@pytest.fixture
def on_cpu(monkeypatch):
    """Let CPU inputs take the fused path (as CUDA inputs do), counting kernel launches."""
    monkeypatch.setattr(fused_lora, "DEVICE_TYPES", {"cpu"})
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = triton_matmul.linear_4bit, triton_matmul.linear_4bit_t
    monkeypatch.setattr(triton_matmul, "linear_4bit", lambda *a, **k: calls.__setitem__("fwd", calls["fwd"] + 1) or fwd(*a, **k))
    monkeypatch.setattr(triton_matmul, "linear_4bit_t", lambda *a, **k: calls.__setitem__("bwd", calls["bwd"] + 1) or bwd(*a, **k))
    return calls


def make_layer(dropout=0.0, bias=True, compute_dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    base = Linear4bit.from_linear(nn.Linear(K, N, bias=bias), compute_dtype=compute_dtype)
    layer = LoraLinear(base, r=R, alpha=10, dropout=dropout)
    nn.init.normal_(layer.lora_B.weight, std=0.1)  # a trained-looking adapter
    return layer


def run(layer, x, dy):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    return y, x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad


@pytest.mark.parametrize("compute_dtype,x_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                                   (torch.bfloat16, torch.float32)])
def test_triton_fused_lora_matches_dense_float32_math(on_cpu, compute_dtype, x_dtype):
    layer = make_layer(compute_dtype=compute_dtype)
    x = torch.randn(2, M, K).to(x_dtype)  # 3-D input: rows are flattened
    dy = torch.randn(2, M, N).to(x_dtype)
    y, gx, ga, gb = run(layer, x, dy)
    assert on_cpu == {"fwd": 1, "bwd": 1}
    assert y.dtype == x_dtype and gx.dtype == x_dtype and ga.dtype == gb.dtype == torch.float32

    w = decoded(layer.base_layer.weight, compute_dtype).float()
    a, b, s = layer.lora_A.weight.to(compute_dtype).float(), layer.lora_B.weight.to(compute_dtype).float(), layer.scaling
    xf, dyf = x.to(compute_dtype).float(), dy.to(compute_dtype).float()
    bias = layer.base_layer.bias.to(compute_dtype).float()
    xa, g = xf @ a.t(), dyf @ b  # rounded to the compute dtype on their own in the fused path
    lora_y = s * xa.abs() @ b.abs().t()
    assert_close(y, xf @ w.t() + s * xa @ b.t() + bias, compute_dtype,
                 xf.abs() @ w.abs().t() + lora_y + bias.abs(), rounded=lora_y)
    lora_x = s * g.abs() @ a.abs()
    assert_close(gx, dyf @ w + s * g @ a, compute_dtype, dyf.abs() @ w.abs() + lora_x, rounded=lora_x)
    rows = lambda t: t.flatten(0, 1)  # noqa: E731
    ga_mag = s * rows(g.abs()).t() @ rows(xf.abs())
    assert_close(ga, s * rows(g).t() @ rows(xf), compute_dtype, ga_mag, rounded=ga_mag)
    gb_mag = s * rows(dyf.abs()).t() @ rows(xa.abs())
    assert_close(gb, s * rows(dyf).t() @ rows(xa), compute_dtype, gb_mag, rounded=gb_mag)


@pytest.mark.parametrize("strategy", ["fused", "workspace"])
def test_triton_fused_lora_matches_the_pytorch_path_with_dropout(on_cpu, monkeypatch, strategy):
    monkeypatch.setattr(fused_lora, "STRATEGY", strategy)
    layer = make_layer(dropout=0.3)
    x, dy = torch.randn(M, K, dtype=torch.bfloat16), torch.randn(M, N, dtype=torch.bfloat16)
    torch.manual_seed(7)
    fused = run(layer, x, dy)  # the same seed draws the same dropout mask on both paths
    assert on_cpu == ({"fwd": 1, "bwd": 1} if strategy == "fused" else {"fwd": 0, "bwd": 0})
    monkeypatch.setattr(fused_lora, "DEVICE_TYPES", set())
    torch.manual_seed(7)
    ref = run(layer, x, dy)
    for got, want in zip(fused, ref):
        err, bound = (got.float() - want.float()).abs(), 3 * 2**-8 * want.float().abs()
        assert (err <= bound + 3 * 2**-8 * want.float().abs().max()).all()
    # dropout really acted: without it the LoRA gradient of A differs
    layer.lora_dropout.p = 0.0
    assert (run(layer, x, dy)[2] - ref[2]).abs().max() > 1e-3


def test_triton_fused_lora_saves_packed_weight_x_and_xa_only(on_cpu):
    layer = make_layer(bias=False)
    x = torch.randn(M, K, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(M, K), (M, R), (R, K), (N, R)]), shapes  # x, x A^T, A, B: no [N, K] weight
    assert any(t.data_ptr() == x.data_ptr() for t in saved)  # x itself (bf16, no dropout): no copy
    y.sum().backward()
    assert x.grad is not None


def test_triton_fused_path_selection(on_cpu, monkeypatch):
    layer = make_layer()
    x = torch.randn(3, K, dtype=torch.bfloat16)
    assert fused_lora.usable(layer.base_layer, x)
    monkeypatch.setenv("QLORA_KERNELS", "reference")
    qlora.kernels.reread_mode()
    assert not fused_lora.usable(layer.base_layer, x)  # the pure-PyTorch oracle on request
    monkeypatch.delenv("QLORA_KERNELS")
    qlora.kernels.reread_mode()
    monkeypatch.setattr(fused_lora, "DEVICE_TYPES", {"cuda"})
    assert not fused_lora.usable(layer.base_layer, x)  # CPU inputs keep the existing path by default
    monkeypatch.setattr(fused_lora, "DEVICE_TYPES", {"cpu"})
    odd = LoraLinear(Linear4bit.from_linear(nn.Linear(33, 8)), r=4)
    assert not fused_lora.usable(odd.base_layer, torch.randn(2, 33))  # odd in_features: rows do not start on a byte
    dense = LoraLinear(nn.Linear(K, N), r=4)
    assert not fused_lora.usable(dense.base_layer, torch.randn(2, K))
    layer.merge()
    assert not fused_lora.usable(layer.base_layer, x)
    layer.unmerge()
    assert fused_lora.usable(layer.base_layer, x)


def test_triton_fused_path_needs_ampere_or_newer(monkeypatch):
    monkeypatch.setattr(fused_lora, "_ARCH_OK", {})
    capability = {0: (7, 5), 1: (8, 0), 2: (9, 0)}  # T4, A100, H100
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: capability[d.index])
    assert [fused_lora.arch_ok(torch.device("cuda", i)) for i in range(3)] == [False, True, True]
    assert fused_lora.arch_ok(torch.device("cpu"))


def test_triton_fused_lora_with_dropout_on_float32_input(on_cpu):
    """h = dropout(x) stays float32: its gradient comes back in x's dtype, masked like the output."""
    layer = make_layer(dropout=0.5)
    x, dy = torch.randn(M, K), torch.randn(M, N)
    torch.manual_seed(3)
    y, gx, ga, gb = run(layer, x, dy)
    assert y.dtype == gx.dtype == torch.float32 and on_cpu == {"fwd": 1, "bwd": 1}
    torch.manual_seed(3)
    h = seeded_dropout(x, 0.5, new_seed())  # the same mask: the seed the layer drew
    w = decoded(layer.base_layer.weight, torch.bfloat16).float()
    a, b, s = layer.lora_A.weight.bfloat16().float(), layer.lora_B.weight.bfloat16().float(), layer.scaling
    dyf = dy.bfloat16().float()
    g = dyf @ b
    expected = dyf @ w + (s * g @ a) * (h != 0) * 2.0  # dropout's backward: mask / (1 - p)
    mag = dyf.abs() @ w.abs() + 2.0 * s * g.abs() @ a.abs()
    assert_close(gx, expected, torch.bfloat16, mag, rounded=mag)
