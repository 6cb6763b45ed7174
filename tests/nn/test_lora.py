"""LoraLinear: init, output and gradients against a dense reference, scaling, dropout,
adapter dtype, bases (Linear4bit, nn.Linear, Conv1D), merge / unmerge, errors.

Parity claims: against the same bf16 ops on the dequantized weight the output is
bit-identical; against an fp32 reference (dequantized W, fp32 A and B) output and
gradients agree within bf16 rounding (rtol 2e-2).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlora import Linear4bit, LoraConfig, LoraLinear


def lora4(r=8, alpha=16, in_f=128, out_f=96, seed=0, **kw):
    torch.manual_seed(seed)
    base = Linear4bit.from_linear(nn.Linear(in_f, out_f))
    layer = LoraLinear(base, r=r, alpha=alpha, **kw)
    nn.init.normal_(layer.lora_B.weight, std=0.1)  # a trained-looking adapter
    return layer


def test_init_is_kaiming_a_and_zero_b_so_a_fresh_adapter_is_the_identity():
    torch.manual_seed(0)
    base = Linear4bit.from_linear(nn.Linear(256, 64))
    layer = LoraLinear(base, r=16, alpha=32)
    a = layer.lora_A.weight
    assert a.shape == (16, 256) and layer.lora_B.weight.shape == (64, 16)
    assert a.dtype == torch.float32 and a.abs().max() <= 1 / math.sqrt(256)
    assert a.std() > 0.5 / math.sqrt(3 * 256)  # uniform(-b, b) has std b / sqrt(3)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    assert torch.equal(layer(x), base(x))
    assert layer.scaling == 2.0
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A.weight", "lora_B.weight"}


def test_output_is_bit_identical_to_the_same_dense_bf16_ops():
    layer = lora4()
    w = layer.base_layer.weight.dequantize(torch.bfloat16)
    b = layer.base_layer.bias.bfloat16()
    x = torch.randn(2, 5, 128, dtype=torch.bfloat16)
    xa = F.linear(x, layer.lora_A.weight.bfloat16())
    # the update is added inside the second GEMM: base + s xa B^T, rounded once
    want = torch.addmm(F.linear(x, w, b).view(10, 96), xa.view(10, 8), layer.lora_B.weight.bfloat16().t(),
                       alpha=layer.scaling)
    assert torch.equal(layer(x), want.view(2, 5, 96))


@pytest.mark.parametrize("rslora", [False, True])
def test_output_and_grads_match_an_fp32_dense_reference(rslora):
    layer = lora4(r=16, alpha=8, use_rslora=rslora)
    scaling = 8 / math.sqrt(16) if rslora else 8 / 16
    assert layer.scaling == pytest.approx(scaling)
    w = layer.base_layer.weight.dequantize(torch.float32)
    b = layer.base_layer.bias.float()
    a_ref = layer.lora_A.weight.detach().clone().requires_grad_(True)
    b_ref = layer.lora_B.weight.detach().clone().requires_grad_(True)
    x = torch.randn(4, 9, 128, dtype=torch.bfloat16, requires_grad=True)
    x_ref = x.detach().float().requires_grad_(True)
    y = layer(x)
    y_ref = F.linear(x_ref, w, b) + scaling * F.linear(F.linear(x_ref, a_ref), b_ref)
    g = torch.randn_like(y_ref)
    y.backward(g.bfloat16())
    y_ref.backward(g)
    tol = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.float(), y_ref, **tol)
    torch.testing.assert_close(x.grad.float(), x_ref.grad, **tol)
    for got, ref in ((layer.lora_A.weight.grad, a_ref.grad), (layer.lora_B.weight.grad, b_ref.grad)):
        assert got.dtype == torch.float32
        assert (got - ref).norm() / ref.norm() < 1e-2


def test_bf16_adapters_and_16bit_lora_over_a_frozen_linear():
    torch.manual_seed(0)
    base = nn.Linear(64, 32).bfloat16()
    layer = LoraLinear(base, r=4, alpha=8, dtype=torch.bfloat16)
    assert layer.lora_A.weight.dtype == torch.bfloat16 and not base.weight.requires_grad
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    layer(x).sum().backward()
    assert base.weight.grad is None and layer.lora_A.weight.grad is not None
    ref = torch.addmm(base(x), F.linear(x, layer.lora_A.weight), layer.lora_B.weight.t(), alpha=2.0)
    assert torch.equal(layer(x), ref)


def test_conv1d_base():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(48, 32)  # in 32, out 48
    layer = LoraLinear(conv, r=4, alpha=4)
    assert (layer.in_features, layer.out_features) == (32, 48)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 32)
    ref = conv(x) + F.linear(F.linear(x, layer.lora_A.weight), layer.lora_B.weight)
    torch.testing.assert_close(layer(x), ref)
    dense = layer.merged_layer(torch.float32)
    torch.testing.assert_close(dense(x), ref, rtol=1e-5, atol=1e-5)


def test_dropout_applies_to_the_adapter_path_only():
    layer = lora4(dropout=0.5)
    x = torch.randn(64, 128, dtype=torch.bfloat16)
    layer.eval()
    y_eval = layer(x)
    layer.train()
    torch.manual_seed(1)
    y_train = layer(x)
    assert not torch.equal(y_eval, y_train)
    nn.init.zeros_(layer.lora_B.weight)
    assert torch.equal(layer(x), layer.base_layer(x))  # the base never sees dropout


def test_merge_into_dequantized_16bit_weight_and_exact_unmerge():
    layer = lora4()
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    before = layer(x)
    four_bit = layer.base_layer
    layer.merge()
    assert layer.merged and isinstance(layer.base_layer, nn.Linear)
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert "base_layer.weight" in layer.state_dict() and not any("absmax" in k for k in layer.state_dict())
    torch.testing.assert_close(layer(x), before, rtol=2e-2, atol=2e-2)
    # the merge adds to the dequantized weight (in fp32, rounded once), it does not re-quantize
    expected = (four_bit.weight.dequantize(torch.float32) + layer.delta_weight()).bfloat16()
    assert torch.equal(layer.base_layer.weight, expected)
    layer.unmerge()
    assert layer.base_layer is four_bit and torch.equal(layer(x), before)


def test_merge_unmerge_dense_base_within_rounding():
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    w0 = base.weight.detach().clone()
    layer = LoraLinear(base, r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 64)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    merged = layer.merged_layer()
    torch.testing.assert_close(merged.weight, layer.base_layer.weight)
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)


def test_merged_layer_leaves_the_module_unchanged():
    layer = lora4()
    dense = layer.merged_layer()
    assert isinstance(dense, nn.Linear) and dense.weight.dtype == torch.bfloat16  # fp32 original -> 16-bit
    assert not layer.merged and isinstance(layer.base_layer, Linear4bit)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    torch.testing.assert_close(dense(x), layer(x), rtol=3e-2, atol=3e-2)


def test_bad_hyperparameters_and_bases():
    base = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="rank"):
        LoraLinear(base, r=0)
    with pytest.raises(ValueError, match="dropout"):
        LoraLinear(base, r=2, dropout=1.0)
    with pytest.raises(ValueError, match="alpha"):
        LoraConfig(alpha=-1)
    with pytest.raises(TypeError, match="dtype"):
        LoraLinear(base, r=2, dtype=torch.int8)
    with pytest.raises(TypeError, match="Embedding"):
        LoraLinear(nn.Embedding(4, 4), r=2)
    assert LoraConfig(r=16, alpha=32).scaling() == 2 and LoraConfig(r=16, alpha=8, use_rslora=True).scaling() == 2


def test_adapters_lie_side_by_side_and_cast_in_one_op_with_the_bits_of_two_casts():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func.overloadpacket is torch.ops.aten._to_copy
            return func(*args, **(kwargs or {}))

    layer = lora4()
    a, b = layer.lora_A.weight, layer.lora_B.weight
    assert b.data_ptr() == a.data_ptr() + 4 * a.numel()  # one buffer [A | B]
    with Casts() as casts:
        a16, b16 = layer.adapters_in(torch.bfloat16)
    assert casts.n == 1
    assert torch.equal(a16, a.detach().bfloat16()) and torch.equal(b16, b.detach().bfloat16())
    assert a16.shape == a.shape and b16.shape == b.shape and not a16.requires_grad
    with torch.no_grad():  # an in-place update (the optimizer's) shows in the next cast
        a.mul_(2)
    assert torch.equal(layer.adapters_in(torch.bfloat16)[0], a.detach().bfloat16())
    old_a = a.detach().clone()
    layer.lora_A.weight.data = a.detach() * 3  # new storage under the same Parameter: two casts of the new values
    with Casts() as casts:
        a16, _ = layer.adapters_in(torch.bfloat16)
    assert casts.n == 2 and torch.equal(a16, (old_a * 3).bfloat16())
    layer.lora_A.weight.data = old_a
    with torch.no_grad():  # separate storages (what .to(device) does): two casts, the same values
        layer.lora_B.weight = nn.Parameter(b.detach().clone())
    with Casts() as casts:
        a16, b16 = layer.adapters_in(torch.bfloat16)
    assert casts.n == 2 and torch.equal(b16, b.detach().bfloat16())
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    ref = lora4()  # the same layer, B's storage separate: the same output and gradients
    ref.lora_B.weight = nn.Parameter(ref.lora_B.weight.detach().clone())
    fresh = lora4()
    for m in (ref, fresh):
        m(x).float().square().sum().backward()
    assert torch.equal(ref(x), fresh(x))
    assert torch.equal(ref.lora_A.weight.grad, fresh.lora_A.weight.grad)
    assert torch.equal(ref.lora_B.weight.grad, fresh.lora_B.weight.grad)
