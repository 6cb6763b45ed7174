"""Seeded dropout (native == reference, bit for bit; the keep rate) and LoRA's dropout branch
(_DropoutA: gradients vs autograd through the explicit mask; what it keeps for backward)."""
import pytest
import torch

from qlora import Linear4bit, LoraLinear
from qlora.nn.dropout import (keep_mask, new_seed, seeded_dropout, seeded_dropout_pair, seeded_dropout_ref,
                               threshold_and_scale)


@pytest.mark.parametrize("mode", ["native", "scalar"])  # QLORA_KERNELS: AVX2, or the C kernel without SIMD
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (33, 9), (2, 129, 65)])
def test_native_equals_reference(mode, dtype, shape, monkeypatch):
    monkeypatch.setenv("QLORA_KERNELS", mode)
    from qlora import kernels
    kernels.reread_mode()
    x = (torch.randn(*shape) * 37).to(dtype)  # rounding to bf16/fp16 after the scale matters
    x.view(-1)[-1] = float("inf")
    assert kernels.seeded_dropout(x, torch.empty_like(x), *threshold_and_scale(0.5), 1)  # the C kernel ran
    for seed in (0, 1, 2**32 + 3, 2**63 + 5, 2**64 - 1):
        as_tensor = torch.tensor(seed - 2**64 if seed >= 2**63 else seed)  # the same 64 bits, read by the kernel
        for p in (0.0, 0.05, 0.5, 0.9):
            ref = seeded_dropout_ref(x, p, seed)
            assert torch.equal(seeded_dropout(x, p, seed), ref), (seed, p)
            assert torch.equal(seeded_dropout(x, p, as_tensor), ref), (seed, p)
            assert torch.equal(seeded_dropout_ref(x, p, as_tensor), ref), (seed, p)
        assert torch.equal(seeded_dropout(x, 0.3, seed, gain=0.25), seeded_dropout_ref(x, 0.3, seed, gain=0.25))
        g = (torch.randn(*shape) * 5).to(dtype)
        h, d = seeded_dropout_pair(x, g, 0.3, as_tensor, gain=0.25)  # one pass: the same mask for both
        assert torch.equal(h, seeded_dropout_ref(x, 0.3, seed)) and torch.equal(d, seeded_dropout_ref(g, 0.3, seed, 0.25))


def test_new_seed_stays_on_its_device_and_replays_with_the_rng():
    torch.manual_seed(3)
    seed = new_seed()
    assert seed.dtype == torch.int64 and seed.shape == () and seed.device.type == "cpu"
    torch.manual_seed(3)
    assert torch.equal(new_seed(), seed)
    with pytest.raises(ValueError, match="one int64"):
        seeded_dropout(torch.randn(4), 0.5, torch.tensor([1, 2]))


def test_non_contiguous_input_uses_its_logical_order():
    x = torch.randn(64, 48)
    assert torch.equal(seeded_dropout(x.t(), 0.3, 9), seeded_dropout_ref(x.t().contiguous(), 0.3, 9))


def test_keep_rate_scale_and_seeds():
    n, p = 1_000_000, 0.1
    mask = keep_mask(n, p, seed=42)
    threshold, scale = threshold_and_scale(p)
    q = threshold / 65536
    assert abs(mask.float().mean().item() - (1 - q)) < 5 * (q * (1 - q) / n) ** 0.5
    assert abs(q - p) <= 1 / 65536 and scale == 1 / (1 - q)
    assert (keep_mask(n, p, seed=43) != mask).float().mean() > 0.15  # another seed, another mask
    assert mask[0::2].float().mean() > 0.89 and mask[1::2].float().mean() > 0.89  # both 16-bit halves used
    x = torch.ones(n)
    y = seeded_dropout(x, p, 42)
    assert torch.equal(y != 0, mask) and torch.all(y[mask] == torch.tensor(scale, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        threshold_and_scale(1.0)


def _explicit(x, a, b, p, seed):
    _, scale = threshold_and_scale(p)
    m = keep_mask(x.numel(), p, seed).view(x.shape)
    return ((x * m * scale) @ a.t()) @ b.t()


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_lora_branch_gradients_match_autograd_through_the_explicit_mask(p):
    torch.manual_seed(0)
    base = Linear4bit.from_linear(torch.nn.Linear(40, 24), compute_dtype=torch.float32)
    layer = LoraLinear(base, r=4, alpha=8, dropout=p).train()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 5, 40, requires_grad=True)
    g = torch.randn(3, 5, 24)
    torch.manual_seed(7)
    y = layer(x)
    y.backward(g)
    torch.manual_seed(7)
    seed = new_seed()  # the seed the layer drew
    x2 = x.detach().clone().requires_grad_(True)
    a2 = layer.lora_A.weight.detach().clone().requires_grad_(True)
    b2 = layer.lora_B.weight.detach().clone().requires_grad_(True)
    ref = base(x2) + layer.scaling * _explicit(x2, a2, b2, p, seed)
    ref.backward(g)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.weight.grad, a2.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.lora_B.weight.grad, b2.grad, rtol=1e-5, atol=1e-4)


def test_lora_branch_keeps_x_not_a_dropped_copy():
    base = Linear4bit.from_linear(torch.nn.Linear(256, 256), compute_dtype=torch.float32)
    layer = LoraLinear(base, r=8, dropout=0.1).train()
    x = torch.randn(64, 256, requires_grad=True)
    big = []

    def pack(t):
        if t.numel() >= x.numel():
            big.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    assert big and all(t.data_ptr() == x.data_ptr() for t in big)  # only x itself, no [64, 256] copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_seeded_dropout_equals_reference(dtype, monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed")
    import os

    from qlora import kernels
    from qlora.kernels import triton_decode, triton_dropout

    assert os.environ.get("TRITON_INTERPRET") == "1" and triton_decode.INTERPRET  # tests/conftest.py sets it
    monkeypatch.setattr(kernels, "TRITON_DEVICE_TYPES", {"cpu"})  # CPU tensors take the Triton path
    calls = []
    kernel = triton_dropout.seeded_dropout
    monkeypatch.setattr(triton_dropout, "seeded_dropout", lambda *a: calls.append(1) or kernel(*a))
    x = (torch.randn(3, 4099) * 37).to(dtype)
    for seed in (0, 2**32 + 3, 0x12345678_9ABCDEF0, 2**64 - 1):  # each 32-bit half below and above 2^31
        for p in (0.05, 0.5):
            assert torch.equal(seeded_dropout(x, p, seed), seeded_dropout_ref(x, p, seed)), (seed, p)
    assert len(calls) == 8


def test_triton_kernel_reads_a_seed_tensor_and_drops_pairs(monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed")
    from qlora import kernels

    monkeypatch.setattr(kernels, "TRITON_DEVICE_TYPES", {"cpu"})
    x = torch.randn(2, 3000)
    for bits in (0, 2**32 + 3, 2**63 + 5, 2**64 - 1):  # negative int64 patterns included
        seed = torch.tensor(bits - 2**64 if bits >= 2**63 else bits, dtype=torch.int64)
        assert torch.equal(seeded_dropout(x, 0.3, seed), seeded_dropout_ref(x, 0.3, bits)), bits
        g = torch.randn(2, 3000).to(torch.bfloat16)
        h, d = seeded_dropout_pair(x.to(torch.bfloat16), g, 0.3, seed, gain=3.0)
        assert torch.equal(h, seeded_dropout_ref(x.to(torch.bfloat16), 0.3, bits))
        assert torch.equal(d, seeded_dropout_ref(g, 0.3, bits, 3.0)), bits


def test_seed_bank_draws_once_a_pass_and_replays_with_the_rng():
    from qlora.nn.dropout import SeedBank

    bank = SeedBank(3)
    torch.manual_seed(0)
    first = [bank.take(i, torch.device("cpu")) for i in (1, 0, 2)]  # layer 1 takes first: the drawer
    assert bank.drawer == 1
    assert len({int(s) for s in first}) == 3 and all(s.dim() == 0 and s.dtype == torch.int64 for s in first)
    assert first[0]._base is not None and all(s._base is first[0]._base for s in first)  # views of one draw
    torch.manual_seed(0)  # what checkpointing's recomputation does: the same RNG, the same order
    again = [bank.take(i, torch.device("cpu")) for i in (1, 0, 2)]
    assert [int(s) for s in again] == [int(s) for s in first]
    later = [bank.take(i, torch.device("cpu")) for i in (1, 0, 2)]  # the next pass: new seeds
    assert all(int(a) != int(b) for a, b in zip(later, again))
