"""Linear4bit: parity with a dense bf16 layer on the dequantized weight, what autograd saves,
the shared workspace, the bitsandbytes state-dict layout, movement and errors.

Parity claim tested here: the output is bit-identical to F.linear on the dequantized bf16
weight (the same kernel on the same bf16 operands); so is grad_input, except on CPUs whose
16-bit GEMM is slow for grad_y @ W (no AVX512-BF16/AMX: see linear4bit.py), where the
product runs in the other layout and agrees within bf16 rounding (rtol 2^-7, measured:
at most one bf16 ulp).
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn

import qlora
from qlora.nn import linear4bit
from qlora.nn.linear4bit import Linear4bit


def make(in_f=128, out_f=96, bias=True, seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    return lin, Linear4bit.from_linear(lin, **kw)


def dense_reference(layer: Linear4bit, dtype=torch.bfloat16):
    w = layer.weight.dequantize(dtype)
    b = None if layer.bias is None else layer.bias.detach().to(dtype)
    return w, b


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 128), (2, 7, 128)])
def test_forward_and_grad_input_equal_dense_bf16_exactly(bias, shape):
    _, layer = make(bias=bias)
    w, b = dense_reference(layer)
    x = torch.randn(shape, dtype=torch.bfloat16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), F.linear(x_ref, w, b)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    if linear4bit.transposed_backward(x.device, torch.bfloat16):
        assert_within_one_bf16_ulp(x.grad, x_ref.grad)
    else:
        assert torch.equal(x.grad, x_ref.grad)


def assert_within_one_bf16_ulp(got, ref):
    got, ref = got.float(), ref.float()
    ulp = torch.finfo(torch.bfloat16).eps * ref.abs().clamp(min=torch.finfo(torch.bfloat16).tiny)
    assert ((got - ref).abs() <= ulp * 1.0001).all(), (got - ref).abs().max()


def test_fp32_input_computes_in_bf16_and_returns_fp32():
    _, layer = make()
    w, b = dense_reference(layer)
    x = torch.randn(4, 128, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, F.linear(x.detach().bfloat16(), w, b).float())
    y.sum().backward()
    assert x.grad.dtype == torch.float32
    ref = torch.ones(4, 96, dtype=torch.bfloat16).matmul(w).float()
    if linear4bit.transposed_backward(x.device, torch.bfloat16):
        assert_within_one_bf16_ulp(x.grad, ref)
    else:
        assert torch.equal(x.grad, ref)


def test_fp32_compute_dtype_matches_fp32_dense():
    _, layer = make(compute_dtype=torch.float32)
    w, b = dense_reference(layer, torch.float32)
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x), F.linear(x, w, b), rtol=1e-6, atol=1e-6)


def test_weight_never_gets_a_gradient_and_bias_grad_when_asked():
    _, layer = make()
    assert not any(p.requires_grad for p in layer.parameters())
    layer.bias.requires_grad_(True)
    w, b = dense_reference(layer)
    x = torch.randn(6, 128, dtype=torch.bfloat16)
    layer(x).square().sum().backward()
    b_ref = layer.bias.detach().clone().requires_grad_(True)
    F.linear(x, w, b_ref.bfloat16()).square().sum().backward()
    torch.testing.assert_close(layer.bias.grad, b_ref.grad, rtol=1e-2, atol=1e-2)
    assert all(not t.requires_grad for t in layer.buffers())


def test_saves_only_the_packed_weight_for_backward():
    """Nothing the size of the weight is saved by autograd; the workspace is not referenced."""
    _, layer = make(in_f=256, out_f=192)
    saved = []
    x = torch.randn(4, 256, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert all(t.numel() < 192 * 256 for t in saved), [tuple(t.shape) for t in saved]
    for ws in linear4bit._WORKSPACES.values():
        ws.fill_(float("nan"))  # backward must decode again, not read a stale copy
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_workspace_is_shared_and_sized_to_the_largest_layer():
    linear4bit.clear_workspaces()
    _, small = make(in_f=64, out_f=64)
    _, big = make(in_f=256, out_f=128)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    small(x)
    assert linear4bit.workspace_bytes() == 64 * 64 * 2
    big(torch.randn(2, 256, dtype=torch.bfloat16))
    small(x)
    assert linear4bit.workspace_bytes() == 256 * 128 * 2
    # the buffer is reused: the next decode lands at the same address
    ptr = linear4bit._WORKSPACES[(torch.device("cpu"), torch.bfloat16)].data_ptr()
    big(torch.randn(2, 256, dtype=torch.bfloat16))
    assert linear4bit._WORKSPACES[(torch.device("cpu"), torch.bfloat16)].data_ptr() == ptr


def test_from_conv1d_transposes_the_weight():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(96, 128)  # nf=out, nx=in; weight [in, out]
    nn.init.normal_(conv.bias)
    layer = Linear4bit.from_linear(conv)
    assert layer.weight.shape == (96, 128) and layer.fan_in_fan_out
    x = torch.randn(2, 3, 128, dtype=torch.bfloat16)
    ref = Conv1D(96, 128)
    ref.weight.data = layer.weight.dequantize(torch.bfloat16).t().contiguous()
    ref.bias.data = conv.bias.detach().bfloat16()
    assert torch.equal(layer(x), ref(x))


def test_dequantize_returns_the_dense_layer():
    lin, layer = make(dtype=torch.bfloat16)
    dense = layer.dequantize()
    assert isinstance(dense, nn.Linear) and dense.weight.dtype == torch.bfloat16
    assert torch.equal(dense.weight, layer.weight.dequantize())
    assert torch.equal(dense.bias, lin.bias)
    rel = (dense.weight.float() - lin.weight.float()).norm() / lin.weight.float().norm()
    assert rel < 0.12  # NF4 relative error on uniform-init weights


def test_state_dict_is_the_bitsandbytes_layout_and_round_trips():
    bnb = pytest.importorskip("bitsandbytes")
    lin, layer = make()
    peer = bnb.nn.Linear4bit(128, 96, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
    peer.load_state_dict(lin.state_dict())
    peer = peer.to("cpu")  # bitsandbytes quantizes on the move
    ours, theirs = layer.state_dict(), peer.state_dict()
    assert list(ours) == list(theirs) or set(ours) == set(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    # and a bitsandbytes state dict loads into a Linear4bit
    _, other = make(seed=1)
    other.load_state_dict(theirs)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    assert torch.equal(other(x), layer(x))


def test_no_double_quant_state_dict_and_dtype_casts_keep_scales():
    _, layer = make(double_quant=False)
    sd = layer.state_dict()
    assert "weight.nested_absmax" not in sd and sd["weight.absmax"].dtype == torch.float32
    before = layer.weight.absmax.clone()
    layer.half()
    assert layer.weight.absmax.dtype == torch.float32 and torch.equal(layer.weight.absmax, before)
    assert layer.bias.dtype == torch.float16
    layer.to("cpu", torch.bfloat16)
    assert torch.equal(layer.weight.absmax, before)


def test_load_state_dict_errors_name_the_tensor():
    _, layer = make()
    _, wrong = make(in_f=64)
    with pytest.raises(RuntimeError, match=r"weight: checkpoint weight has shape \(96, 64\)"):
        layer.load_state_dict(wrong.state_dict())
    sd = layer.state_dict()
    del sd["weight.absmax"]
    with pytest.raises(RuntimeError, match="weight.absmax"):
        layer.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="Missing key.*weight"):
        layer.load_state_dict({"bias": layer.bias.detach()})


def test_bad_inputs_raise_clear_errors():
    _, layer = make()
    with pytest.raises(ValueError, match=r"Linear4bit\(128 -> 96\) got input of shape \(2, 64\)"):
        layer(torch.randn(2, 64))
    with pytest.raises(TypeError, match="Conv2d"):
        Linear4bit.from_linear(nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match="QuantizedTensor"):
        Linear4bit(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="bias has shape"):
        Linear4bit(qlora.quantize(torch.randn(8, 64)), bias=torch.zeros(7))
    with pytest.raises(ValueError, match="meta"):
        Linear4bit.from_linear(nn.Linear(64, 64, device="meta"))


def test_autocast_does_not_change_the_result():
    _, layer = make()
    x = torch.randn(3, 128)
    with torch.autocast("cpu", dtype=torch.float16):
        y = layer(x)
    assert y.dtype == torch.float32 and torch.equal(y, layer(x))


@settings(max_examples=25, deadline=None)
@given(in_f=st.integers(1, 200), out_f=st.integers(1, 70), rows=st.integers(1, 5),
       blocksize=st.sampled_from([32, 64, 128]), double_quant=st.booleans(), quant_type=st.sampled_from(["nf4", "fp4"]))
def test_forward_parity_over_shapes(in_f, out_f, rows, blocksize, double_quant, quant_type):
    """Any shape (odd sizes, blocks crossing rows): output == F.linear on the decoded weight."""
    _, layer = make(in_f=in_f, out_f=out_f, blocksize=blocksize, double_quant=double_quant, quant_type=quant_type)
    w, b = dense_reference(layer)
    x = torch.randn(rows, in_f, dtype=torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, w, b))


def test_the_cached_quantized_tensor_follows_loads_moves_and_metadata():
    """`weight` hands back the QuantizedTensor it made last (and the decode its native arguments)
    while the buffers and metadata are the same; a load, a move or new metadata makes a new one."""
    _, layer = make(seed=0)
    _, other = make(seed=1)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    first = layer(x)
    assert layer.weight is layer.weight
    assert torch.equal(layer(x), first)  # the cached decode call writes the same bits
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer(x), other(x)) and not torch.equal(layer(x), first)
    before = layer.weight
    layer.to("cpu", torch.bfloat16)
    assert layer.weight is not before and torch.equal(layer(x), other(x))
    qt = layer.weight
    layer.set_tensor_meta(type(qt)(qt.data, qt.absmax, qt.shape, torch.float16, qt.quant_type, qt.blocksize,
                                   qt.code, qt.nested_absmax, qt.nested_code, qt.nested_offset + 0.5))
    assert layer.weight.dtype == torch.float16 and layer.weight.nested_offset == qt.nested_offset + 0.5
    assert not torch.equal(layer(x), other(x))  # the decode reads the new offset
    import copy
    twin = copy.deepcopy(layer)  # the caches copy too (plain numbers), and are not reused for the copy's buffers
    assert twin.weight is not layer.weight and torch.equal(twin(x), layer(x))
