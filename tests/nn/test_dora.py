"""DoraLinear (qlora/nn/dora.py) against the DoRA formula in dense float32 math: the chunked row
norms, forward and gradients, a fresh layer = its base, merge; the cache follows A and B."""
import pytest
import torch

from qlora import DoraLinear, Linear4bit
from qlora.nn.dora import row_norms


def _layer(out=40, inp=48, r=4, bias=True, seed=0):
    torch.manual_seed(seed)
    base = Linear4bit.from_linear(torch.nn.Linear(inp, out, bias=bias), "nf4", 64, True, torch.float32)
    layer = DoraLinear(base, r=r, alpha=8)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.3)
        layer.lora_magnitude_vector.mul_(torch.rand(out) + 0.5)
    return layer


def _dense(layer):
    w = layer.base_layer.weight.dequantize(torch.float32)
    return w, layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector, layer.base_layer.bias


def test_row_norms_decode_a_few_rows_at_a_time():
    layer = _layer(out=40, inp=48)  # rows of 48: chunks start inside 64-element blocks
    w, a, b, _, _ = _dense(layer)
    want = torch.linalg.vector_norm(w + layer.scaling * b @ a, dim=1)
    for chunk in (48, 100, 1 << 20):  # one row a chunk, partial blocks, all at once
        got = row_norms(layer.base_layer, a, b, layer.scaling, chunk_elements=chunk)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_a_fresh_layer_computes_its_base():
    torch.manual_seed(0)
    base = Linear4bit.from_linear(torch.nn.Linear(64, 32), "nf4", 64, True, torch.float32)
    layer = DoraLinear(base, r=4, alpha=8)
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), base(x))
    torch.testing.assert_close(layer.lora_magnitude_vector,
                               torch.linalg.vector_norm(base.weight.dequantize(torch.float32), dim=1))


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_follow_the_formula(bias):
    layer = _layer(bias=bias)
    w, a, b, m, bb = _dense(layer)
    x = torch.randn(2, 5, 48, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    got = {"x": x.grad, "A": a.grad, "B": b.grad, "m": m.grad}

    a2, b2, m2 = (t.detach().clone().requires_grad_(True) for t in (a, b, m))
    x2 = x.detach().clone().requires_grad_(True)
    s = layer.scaling
    norm = torch.linalg.vector_norm(w + s * b2 @ a2, dim=1).detach()  # detached, as DoRA section 4.3 and PEFT
    want = (m2 / norm) * (x2 @ w.t() + s * (x2 @ a2.t()) @ b2.t()) + (bb if bias else 0)
    (want * g).sum().backward()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    for k, ref in {"x": x2.grad, "A": a2.grad, "B": b2.grad, "m": m2.grad}.items():
        torch.testing.assert_close(got[k], ref, rtol=1e-4, atol=1e-5, msg=k)


def test_the_norm_is_cached_until_a_or_b_changes():
    layer = _layer()
    first = layer.weight_norm()
    assert layer.weight_norm() is first  # a recompute (checkpointing) or eval reuses it
    with torch.no_grad():
        layer.lora_A.weight.add_(0.1)  # what an optimizer step does
    second = layer.weight_norm()
    assert second is not first and not torch.allclose(second, first)
    w, a, b, _, _ = _dense(layer)
    torch.testing.assert_close(second, torch.linalg.vector_norm(w + layer.scaling * b @ a, dim=1))


def test_merge_folds_magnitude_and_direction():
    layer = _layer()
    x = torch.randn(4, 48)
    with torch.no_grad():
        want = layer(x)
        dense = layer.merged_layer(torch.float32)
        torch.testing.assert_close(dense(x), want, rtol=1e-5, atol=1e-5)
        layer.merge()
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        assert torch.equal(layer(x), want)
