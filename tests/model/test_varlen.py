"""--attn-implementation varlen (model/varlen.py): packed rows through torch's varlen attention.
On the CPU qlora's kernel (SDPA's CPU flash kernels once per document) stands in for the CUDA one;
every other part of the path (boundaries made on the host, handed over by share and model_inputs,
the layout in and out, the fallback for calls without boundaries) is the one a GPU runs."""
import pytest
import torch

from qlora.errors import InputError
from qlora.model.attention import set_attention
from qlora.model.loss import causal_lm_loss
from qlora.model.packing import block_causal_mask, model_inputs
from qlora.model import varlen
from qlora.model.varlen import (NAME, cu_seq_lens, placeholder_mask, torch_varlen, varlen_attention_forward,
                                 varlen_reference)
from qlora.train import data as D
from qlora.train.distributed import Ranks, share

from test_packing import _documents, _grads, _model, _one_by_one
import varlen_cpu
from tiny_models import tiny_model


def _varlen(model):
    set_attention(model, NAME, "cpu")
    assert model.config._attn_implementation == NAME
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_the_cpu_kernel_is_sdpa_once_per_document(dtype, kv_heads):
    """varlen_cpu (causal): each document's output and q, k, v gradients are SDPA's (is_causal,
    GQA) on that document alone, bit for bit; within rounding of the reference."""
    g = torch.Generator().manual_seed(1)
    cu = torch.tensor([0, 7, 20, 21, 50], dtype=torch.int32)
    q, k, v = (torch.randn(50, n, 16, generator=g).to(dtype).requires_grad_() for n in (4, kv_heads, kv_heads))
    grad = torch.randn(50, 4, 16, generator=g).to(dtype)
    out = varlen.varlen_cpu(q, k, v, cu, cu, 29, 29, scale=0.2, window_size=(-1, 0), enable_gqa=kv_heads != 4)
    got = torch.autograd.grad(out, (q, k, v), grad)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t.detach()[s:e].transpose(0, 1)[None].requires_grad_() for t in (q, k, v))
        want = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=0.2,
                                                                enable_gqa=kv_heads != 4)[0]
        assert torch.equal(out[s:e], want.transpose(0, 1))
        want_grads = torch.autograd.grad(want, (qs, ks, vs), grad[s:e].transpose(0, 1))
        for a, b in zip(got, want_grads):
            assert torch.equal(a[s:e], b[0].transpose(0, 1))
    ref = varlen_reference(q, k, v, cu, cu, 29, 29, scale=0.2, window_size=(-1, 0), enable_gqa=kv_heads != 4)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    for a, b in zip(got, torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, **tol)


def test_boundaries_made_on_the_host():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1]])
    cu, longest = cu_seq_lens(pos)
    assert cu.tolist() == [0, 3, 5, 8, 14, 16] and cu.dtype == torch.int32 and longest == 6
    cu, longest = cu_seq_lens(None, (3, 4))  # rows without documents: one sequence each
    assert cu.tolist() == [0, 4, 8, 12] and longest == 4
    cu, _ = cu_seq_lens(torch.tensor([[0, 1, 2], [3, 4, 5]]))  # a row that goes on counting still starts anew
    assert cu.tolist() == [0, 3, 6]


@pytest.mark.parametrize("window, gqa", [((-1, 0), False), ((-1, 0), True), ((3, 0), True)])
def test_the_reference_is_sdpa_with_the_block_mask(window, gqa):
    g = torch.Generator().manual_seed(0)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]])
    b, t, heads, kv = 2, 10, 4, 2 if gqa else 4
    q, k, v = (torch.randn(b, n, t, 8, generator=g) for n in (heads, kv, kv))
    mask = block_causal_mask(t, pos, window=None if window[0] < 0 else window[0] + 1)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    cu, longest = cu_seq_lens(pos)
    flat = [x.transpose(1, 2).reshape(b * t, x.shape[1], 8) for x in (q, k, v)]
    got = varlen_reference(*flat, cu, cu, longest, longest, window_size=window, enable_gqa=gqa)
    torch.testing.assert_close(got.view(b, t, heads, 8), want.transpose(1, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch, overrides", [("llama", {}), ("qwen2", {}), ("gpt2", {}), ("gemma", {}), ("phi3", {}),
                                             ("mistral", {"sliding_window": 6})])
def test_a_packed_batch_through_varlen_equals_documents_one_by_one(arch, overrides, host_reads, monkeypatch):
    """As the trainer runs it (share, then the loss): the loss and LoRA gradients of the
    documents run alone, and nothing read back from the device inside the step."""
    model = _varlen(_model(arch, torch.float32, **overrides))
    calls = []
    monkeypatch.setattr(varlen, "varlen_cpu", lambda *a, _f=varlen.varlen_cpu, **k: calls.append(1) or _f(*a, **k))
    docs = _documents(seed=7)
    ref_loss, ref_grads = _one_by_one(model, docs)  # no boundaries handed over: transformers' SDPA
    batch = share(D.collate(D.pack(docs, 40), pad=0, multiple=16), Ranks(), boundaries=True)
    assert "cu_seq_lens" in batch and "attention_mask" in model_inputs(batch, model.config)
    with host_reads() as reads:
        loss = causal_lm_loss(model, batch)
        grads = _grads(model, loss)
    assert reads.seen == [], reads.seen
    assert len(calls) >= 2 * model.config.num_hidden_layers  # forward and its recompute, every layer
    torch.testing.assert_close(loss.detach().float(), ref_loss, rtol=1e-5, atol=1e-6)
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("arch, overrides", [("llama", {}), ("gpt2", {}), ("mistral", {"sliding_window": 6})])
def test_through_torchs_own_varlen_op(arch, overrides, monkeypatch):
    """The same, through torch's varlen_attn itself (its custom op, autograd and arguments; the
    CPU kernels of tests/model/varlen_cpu.py under it, as torch has CUDA ones only)."""
    varlen_cpu.install()
    monkeypatch.setattr(varlen, "_kernel", lambda query: varlen.torch_varlen)
    model = _varlen(_model(arch, torch.float32, **overrides))
    docs = _documents(seed=9)
    ref_loss, ref_grads = _one_by_one(model, docs)
    loss = causal_lm_loss(model, share(D.collate(D.pack(docs, 40), pad=0, multiple=16), Ranks(), boundaries=True))
    grads = _grads(model, loss)
    torch.testing.assert_close(loss.detach().float(), ref_loss, rtol=1e-5, atol=1e-6)
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


def test_the_trainer_hands_boundaries_only_to_a_varlen_model(monkeypatch):
    """forward_backward asks share for the boundaries where the model runs varlen: an sdpa
    model's batches carry none (no host work, no copy for them), a varlen model's do."""
    from qlora.train import loop

    handed = []
    real_share = loop.dist_.share
    monkeypatch.setattr(loop.dist_, "share", lambda *a, **k: handed.append(real_share(*a, **k)) or handed[-1])
    model = _model("llama", torch.float32)
    batch = D.collate(D.pack(_documents(seed=10), 40), pad=0)
    loop.forward_backward(model, [batch], Ranks())
    _varlen(model)
    loop.forward_backward(model, [batch], Ranks())
    assert ["cu_seq_lens" in b for b in handed] == [False, True]


def test_padded_rows_and_calls_without_boundaries_stay_right(monkeypatch):
    """Right-padded rows are one sequence each (a token never sees its row's padding); a call
    without boundaries (a left-padded batch, generation) runs SDPA with transformers' mask."""
    calls = []
    monkeypatch.setattr(varlen, "varlen_cpu", lambda *a, _f=varlen.varlen_cpu, **k: calls.append(1) or _f(*a, **k))
    model = _model("llama", torch.float32)
    docs = _documents(seed=8)
    padded = D.collate(docs, pad=0)
    sdpa_loss = causal_lm_loss(model, share(padded, Ranks())).detach()
    left = {k: v.flip(-1) for k, v in padded.items()}  # left padding: no boundaries from share
    with torch.no_grad():
        sdpa_left = model(input_ids=left["input_ids"], attention_mask=left["attention_mask"]).logits
        prompt = torch.tensor([[5, 6, 7, 8]])
        sdpa_text = model.generate(prompt, max_new_tokens=6, do_sample=False)
    _varlen(model)
    shared = share(padded, Ranks(), boundaries=True)
    assert shared["cu_seq_lens"].tolist() == [padded["input_ids"].shape[1] * i for i in range(len(docs) + 1)]
    torch.testing.assert_close(causal_lm_loss(model, shared).detach(), sdpa_loss, rtol=1e-5, atol=1e-6)
    assert calls  # through varlen
    calls.clear()
    assert "cu_seq_lens" not in share(left, Ranks(), boundaries=True)
    with torch.no_grad():
        got = model(input_ids=left["input_ids"], attention_mask=left["attention_mask"]).logits
        real = left["attention_mask"].bool()
        torch.testing.assert_close(got[real], sdpa_left[real], rtol=1e-5, atol=1e-5)
        assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), sdpa_text)
    assert not calls  # those through SDPA


def test_what_varlen_has_no_form_for_is_refused_not_dropped():
    """Attention dropout (in the config: at the flag; set later: at the call), architectures not
    checked, arguments the kernel lacks (Gemma-2's softcap, sinks), a module that is not
    causal, and the placeholder mask reaching a layer without the boundaries."""
    with pytest.raises(InputError, match="varlen attention has no dropout"):
        set_attention(tiny_model("gpt2", torch.float32, attn_pdrop=0.1), NAME, "cuda")
    model = _model("llama", torch.float32)
    model.config.model_type = "gemma2"
    with pytest.raises(InputError, match="checked for llama, .* not 'gemma2'"):
        set_attention(model, NAME, "cuda")
    model = _varlen(_model("gpt2", torch.float32))
    for module in model.modules():
        if hasattr(module, "attn_dropout"):
            module.attn_dropout.p = 0.1
    batch = share(D.collate(D.pack(_documents(), 40), pad=0), Ranks(), boundaries=True)
    with pytest.raises(ValueError, match="varlen attention has no dropout"):
        causal_lm_loss(model, batch)
    layer = torch.nn.Module()
    q = torch.randn(1, 2, 4, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="passes softcap"):
        varlen_attention_forward(layer, q, q, q, None, cu_seq_lens_q=cu, max_length_q=4, softcap=50.0)
    layer.is_causal = False
    with pytest.raises(ValueError, match="is not causal"):
        varlen_attention_forward(layer, q, q, q, None, cu_seq_lens_q=cu, max_length_q=4)
    with pytest.raises(RuntimeError, match="placeholder mask without the batch's boundaries"):
        varlen_attention_forward(layer, q, q, q, placeholder_mask(q.device))


@pytest.mark.parametrize("torch_version", ["2.13", "2.10"])
def test_torchs_varlen_is_called_as_the_installed_torch_takes_it(torch_version, monkeypatch):
    """torch 2.13's varlen_attn takes a window, a scale and GQA; 2.10's only is_causal: the
    call adapts (causal flag, kv heads repeated, the scale folded into the queries). The
    kernel itself is faked by the reference here (CUDA only)."""
    import torch.nn.attention.varlen as torch_module

    def new(query, key, value, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
            enable_gqa=False):
        return varlen_reference(query, key, value, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size,
                                enable_gqa=enable_gqa)

    def old(query, key, value, cu_q, cu_k, max_q, max_k, *, is_causal=False, return_aux=None):
        assert query.shape[1] == key.shape[1]  # no GQA there
        return varlen_reference(query, key, value, cu_q, cu_k, max_q, max_k,
                                window_size=(-1, 0) if is_causal else (-1, -1))

    monkeypatch.setattr(torch_module, "varlen_attn", new if torch_version == "2.13" else old)
    g = torch.Generator().manual_seed(0)
    cu, longest = cu_seq_lens(torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]]))
    q, k, v = (torch.randn(12, n, 8, generator=g) for n in (4, 2, 2))
    want = varlen_reference(q, k, v, cu, cu, longest, longest, scale=0.3, window_size=(-1, 0), enable_gqa=True)
    got = torch_varlen(q, k, v, cu, cu, longest, longest, scale=0.3, window_size=(-1, 0), enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if torch_version == "2.10":
        with pytest.raises(ValueError, match="no sliding-window varlen attention"):
            torch_varlen(q, k, v, cu, cu, longest, longest, window_size=(5, 0), enable_gqa=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch's varlen kernels)")
def test_torchs_kernel_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1] * 8])
    cu, longest = cu_seq_lens(pos)
    q, k, v = (torch.randn(80, n, 64, generator=g).cuda().bfloat16().requires_grad_() for n in (8, 2, 2))
    for window, scale in (((-1, 0), None), ((3, 0), 0.3)):
        got = torch_varlen(q, k, v, cu.cuda(), cu.cuda(), longest, longest, scale=scale, window_size=window,
                           enable_gqa=True)
        want = varlen_reference(q, k, v, cu.cuda(), cu.cuda(), longest, longest, scale=scale, window_size=window,
                                enable_gqa=True)
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    dq, = torch.autograd.grad(got.float().square().sum(), q)
    dq_ref, = torch.autograd.grad(want.float().square().sum(), q)
    torch.testing.assert_close(dq.float(), dq_ref.float(), rtol=5e-2, atol=5e-2)
