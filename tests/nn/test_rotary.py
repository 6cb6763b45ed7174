"""The fused rotary embedding (nn/rotary.py): forward and backward the same values as
transformers' own apply_rotary_pos_emb, on the C kernel and on Triton (interpreter); one kernel
call a direction; the reference where no kernel takes the tensors."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from qlora import kernels
from qlora.nn import rotary
from qlora.nn.rotary import apply_rotary, rotary_ref


def _inputs(dtype, batch=2, cos_batch=1, heads=8, kv_heads=2, tokens=7, dim=16, layout="llama", seed=0):
    """q, k as transformers' Llama attention makes them ([b, t, h, d] transposed), cos and sin as
    its rotary embedding does (cat(freqs, freqs); position ids restarting per row when cos_batch > 1)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "llama":
        q = (torch.randn(batch, tokens, heads, dim, generator=g) * 3).to(dtype).transpose(1, 2)
        k = (torch.randn(batch, tokens, kv_heads, dim, generator=g) * 3).to(dtype).transpose(1, 2)
    elif layout == "contiguous":
        q = (torch.randn(batch, heads, tokens, dim, generator=g) * 3).to(dtype)
        k = (torch.randn(batch, kv_heads, tokens, dim, generator=g) * 3).to(dtype)
    else:  # slices of one fused projection: not dense
        qkv = (torch.randn(batch, tokens, (heads + 2 * kv_heads) * dim, generator=g) * 3).to(dtype)
        q = qkv[..., :heads * dim].view(batch, tokens, heads, dim).transpose(1, 2)
        k = qkv[..., heads * dim:(heads + kv_heads) * dim].view(batch, tokens, kv_heads, dim).transpose(1, 2)
    pos = torch.stack([torch.arange(tokens) + 5 * row for row in range(cos_batch)]).float()
    freqs = pos[..., None] / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    emb = torch.cat([freqs, freqs], -1)
    return q.requires_grad_(), k.requires_grad_(), emb.cos().to(dtype), emb.sin().to(dtype)


def _run(fn, q, k, cos, sin, seed=1):
    qo, ko = fn(q, k, cos, sin)
    g = torch.Generator().manual_seed(seed)
    gq = (torch.randn(qo.shape, generator=g) * 2).to(qo.dtype)
    gk = (torch.randn(ko.shape, generator=g) * 2).to(ko.dtype)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (gq, gk))
    return qo, ko, dq, dk


CASES = [dict(), dict(cos_batch=2), dict(batch=1), dict(layout="contiguous"), dict(layout="fused"),
         dict(heads=4, kv_heads=4, tokens=1), dict(dim=80, tokens=33), dict(dim=6, heads=3, kv_heads=1),
         dict(dim=36, tokens=300, heads=16, kv_heads=4, cos_batch=2)]  # a vector tail; rows over several threads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_fused_equals_transformers_forward_and_backward(dtype, case, monkeypatch):
    calls = []
    kernel = kernels.rotary
    monkeypatch.setattr(kernels, "rotary", lambda *a, **k: calls.append(k.get("backward", False)) or kernel(*a, **k))
    q, k, cos, sin = _inputs(dtype, **CASES[case])
    ours = _run(apply_rotary, q, k, cos, sin)
    theirs = _run(apply_rotary_pos_emb, q, k, cos, sin)
    assert calls == [False, True]  # one kernel call forward, one backward
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(ours, _run(rotary_ref, q, k, cos, sin)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_portable_loops_equal_the_vector_ones(dtype, monkeypatch):
    """QLORA_KERNELS=scalar: the C kernel without its AVX2 loops, the same values."""
    monkeypatch.setenv("QLORA_KERNELS", "scalar")
    kernels.reread_mode()
    try:
        assert not kernels.has_simd()
        for case in (dict(dim=36, tokens=9), dict(dim=64, cos_batch=2)):
            q, k, cos, sin = _inputs(dtype, **case)
            for a, b in zip(_run(apply_rotary, q, k, cos, sin), _run(apply_rotary_pos_emb, q, k, cos, sin)):
                assert torch.equal(a, b), case
    finally:
        monkeypatch.delenv("QLORA_KERNELS")
        kernels.reread_mode()


def test_the_forward_launches_nothing_but_its_kernel():
    """Ten aten ops forward in transformers' form; here only the two outputs' allocations."""
    q, k, cos, sin = _inputs(torch.bfloat16)
    ops = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Ops():
        qo, ko = apply_rotary(q, k, cos, sin)
    assert ops == ["empty_like", "empty_like"]
    ops.clear()
    with Ops():
        apply_rotary_pos_emb(q, k, cos, sin)
    assert len([op for op in ops if op not in ("unsqueeze", "slice")]) == 10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_kernel_equals_transformers(dtype, monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed")
    from qlora.kernels import triton_decode, triton_rotary

    assert triton_decode.INTERPRET  # tests/conftest.py sets TRITON_INTERPRET=1
    monkeypatch.setattr(kernels, "TRITON_DEVICE_TYPES", {"cpu"})  # CPU tensors take the Triton path
    calls = []
    kernel = triton_rotary.rotary
    monkeypatch.setattr(triton_rotary, "rotary", lambda *a: calls.append(1) or kernel(*a))
    for case in (dict(), dict(cos_batch=2, layout="fused"), dict(dim=80, tokens=3, heads=5, kv_heads=1)):
        q, k, cos, sin = _inputs(dtype, **case)
        for a, b in zip(_run(apply_rotary, q, k, cos, sin), _run(apply_rotary_pos_emb, q, k, cos, sin)):
            assert torch.equal(a, b), case
    assert len(calls) == 6


def test_what_no_kernel_takes_runs_the_reference(monkeypatch):
    q, k, cos, sin = _inputs(torch.bfloat16)
    fused = lambda *a, **kw: type(apply_rotary(*a, **kw)[0].grad_fn).__name__  # noqa: E731
    assert fused(q, k, cos, sin) == "_RotaryBackward"
    assert fused(q, k, cos.float(), sin.float()) == "AddBackward0"  # mixed dtypes: torch promotes
    assert fused(q.double(), k.double(), cos.double(), sin.double()) == "AddBackward0"
    c = cos.clone().requires_grad_()
    qo, ko = apply_rotary(q, k, c, sin)
    assert type(qo.grad_fn).__name__ == "AddBackward0"
    (qo.sum() + ko.sum()).backward()
    assert c.grad is not None  # a trainable cos gets its gradient
    monkeypatch.setenv("QLORA_KERNELS", "reference")
    kernels.reread_mode()
    try:
        assert fused(q, k, cos, sin) == "AddBackward0"
    finally:
        monkeypatch.delenv("QLORA_KERNELS")
        kernels.reread_mode()


def test_unsqueeze_dim_two_is_transformers_layout_for_it():
    """[b, t, h, d] tensors (unsqueeze_dim=2) go to the reference, with transformers' values."""
    q, k, cos, sin = _inputs(torch.bfloat16)
    q2, k2 = q.detach().transpose(1, 2), k.detach().transpose(1, 2)
    ours = apply_rotary(q2, k2, cos, sin, unsqueeze_dim=2)
    theirs = apply_rotary_pos_emb(q2, k2, cos, sin, unsqueeze_dim=2)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_hook_is_installed_per_module_and_nothing_global_changes(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    before = modeling_llama.apply_rotary_pos_emb
    a, b = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    assert rotary.use_fused_rotary(a) == 2 and rotary.use_fused_rotary(a) == 2  # twice: still 2, not wrapped twice
    assert modeling_llama.apply_rotary_pos_emb is before
    seen = []
    kernel = kernels.rotary
    monkeypatch.setattr(kernels, "rotary", lambda *a, **kw: seen.append(1) or kernel(*a, **kw))
    c = copy.deepcopy(a)
    for model, expected in ((a, 2), (b, 0), (c, 2)):  # one kernel call per layer
        seen.clear()
        model(torch.randint(0, 100, (1, 5)))
        assert len(seen) == expected
    hook = c.model.layers[0].self_attn._kernel_funcs[rotary.HOOK]
    assert hook.forward.__self__ is hook  # the copy's hook, bound to the copy


def test_an_unused_output_leaves_its_gradient_none_and_double_backward_is_exact():
    q, k, cos, sin = _inputs(torch.bfloat16)
    qo, _ = apply_rotary(q, k, cos, sin)
    qr, _ = apply_rotary_pos_emb(q, k, cos, sin)
    g = torch.randn_like(qo)
    (dq,) = torch.autograd.grad(qo, q, g)
    (dq_ref,) = torch.autograd.grad(qr, q, g)
    assert torch.equal(dq, dq_ref)
    qo, ko = apply_rotary(q, k, cos, sin)
    qo.float().sum().backward()
    assert q.grad is not None and k.grad is None  # as transformers' leaves it (weight decay skips k)
    w = torch.tensor(1.5, requires_grad=True)  # a gradient of a gradient: the backward op by op, differentiable
    twice = []
    for f in (apply_rotary, apply_rotary_pos_emb):
        qo, ko = f(q.detach() * w, k.detach(), cos, sin)
        (gw,) = torch.autograd.grad(qo.float().square().sum() + ko.float().sum(), w, create_graph=True)
        twice.append(torch.autograd.grad(gw + w ** 2, w)[0])
    assert torch.equal(twice[0], twice[1]) and twice[0] > 10


def test_fake_tensors_and_stub_hooks_take_the_reference():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # no memory to write: the kernel must not run (it would write through a bad pointer)
        q, k, cos, sin = _inputs(torch.bfloat16)
        qo, ko = apply_rotary(q, k, cos, sin)
        assert qo.shape == q.shape and type(qo.grad_fn).__name__ == "AddBackward0"
    q, k, cos, sin = _inputs(torch.bfloat16)
    wrong = torch.empty_like(q, dtype=torch.float32)
    assert not kernels.rotary(q, k, cos, sin, wrong, torch.empty_like(k))  # an output of another dtype: refused


def test_a_transformers_without_kernel_hooks_keeps_its_rotary(monkeypatch):
    """transformers 4 (or no `kernels` package): apply_rotary_pos_emb is a plain function, no hook."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", rotary._original(modeling_llama.apply_rotary_pos_emb))
    for m in model.modules():
        m.__dict__.pop("_kernel_funcs", None)
    assert rotary.use_fused_rotary(model) == 0


@pytest.mark.parametrize("mode", ["native", "scalar"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_special_values_round_as_torch_rounds_them(dtype, mode, monkeypatch):
    """NaN, infinities, subnormals, zeros and values that overflow: the vector and portable loops alike."""
    monkeypatch.setenv("QLORA_KERNELS", mode)
    kernels.reread_mode()
    try:
        q, k, cos, sin = _inputs(dtype, dim=48, tokens=5, layout="contiguous")
        info = torch.finfo(dtype)
        special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, info.tiny / 4, info.max,
                                -info.max, info.tiny, 1e-30], dtype=torch.float32).to(dtype)
        with torch.no_grad():
            q.view(-1)[:special.numel() * 7:7] = special  # spread over both halves and several heads
            k.view(-1)[3:special.numel() * 5 + 3:5] = special
        ours = _run(apply_rotary, q, k, cos, sin)
        theirs = _run(apply_rotary_pos_emb, q, k, cos, sin)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    finally:
        monkeypatch.delenv("QLORA_KERNELS")
        kernels.reread_mode()
