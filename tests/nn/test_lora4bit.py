"""LoRA over a Linear4bit in one Function (qlora/nn/lora4bit.py) against the two-Function oracle
(QLORA_KERNELS=reference: Linear4bit's _DequantLinear, _DropoutA, addmm)."""
import pytest
import torch

from qlora import Linear4bit, LoraLinear, kernels


def _layer(dtype: torch.dtype, bias: bool, p: float) -> LoraLinear:
    torch.manual_seed(0)
    base = Linear4bit.from_linear(torch.nn.Linear(128, 96, bias=bias), compute_dtype=dtype)
    layer = LoraLinear(base, r=8, alpha=16, dropout=p).train()
    if bias:
        base.bias.requires_grad_(True)  # frozen by default; its gradient is checked too
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.5)  # a trained B: the update is not zero
    return layer


def _run(layer: LoraLinear, x: torch.Tensor, g: torch.Tensor, mode: str, monkeypatch) -> list[torch.Tensor]:
    monkeypatch.setenv("QLORA_KERNELS", mode)
    kernels.reread_mode()
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(11)  # the same dropout seed on both paths
    y = layer(x)
    y.backward(g)
    grads = [x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]
    if layer.base_layer.bias is not None:
        grads.append(layer.base_layer.bias.grad)
    return [y.detach()] + grads


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_function_equals_the_two_function_oracle(dtype, bias, p, monkeypatch):
    layer = _layer(dtype, bias, p)
    x = torch.randn(3, 10, 128).to(dtype)
    g = torch.randn(3, 10, 96).to(dtype)
    got = _run(layer, x, g, "native", monkeypatch)
    want = _run(layer, x, g, "reference", monkeypatch)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, a, b in zip(["y", "x.grad", "A.grad", "B.grad", "bias.grad"], got, want):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, **tol, msg=name)


def test_the_oracle_path_is_the_one_function_path_off(monkeypatch):
    """The one-Function path really ran (one autograd node), and the oracle did not."""
    layer = _layer(torch.float32, False, 0.1)
    x = torch.randn(4, 128, requires_grad=True)
    assert type(layer(x).grad_fn).__name__ == "Lora4bitLinearBackward"
    monkeypatch.setenv("QLORA_KERNELS", "reference")
    kernels.reread_mode()
    assert type(layer(x).grad_fn).__name__ != "Lora4bitLinearBackward"
