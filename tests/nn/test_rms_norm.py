"""qlora's RMSNorm: forward bit for bit the fp32 formula transformers' Llama norm runs behind
prepare_model's fp32 hooks; backward within float32 rounding of autograd through that formula;
what it saves; the reference and compile paths."""
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from qlora.model.prepare import _norm_post_hook, _norm_pre_hook
from qlora.nn.rms_norm import RMSNorm, is_llama_style, rms_norm_ref


def _hf_fp32(hidden: int, eps: float) -> LlamaRMSNorm:
    """transformers' norm as prepare_model kept it before: fp32 weight, fp32 hooks around it."""
    hf = LlamaRMSNorm(hidden, eps)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(hidden) * 0.5 + 1)
    hf.register_forward_pre_hook(_norm_pre_hook)
    hf.register_forward_hook(_norm_post_hook)
    return hf


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden", [64, 200, 576, 1001])
def test_forward_is_bit_exact_and_backward_within_rounding(dtype, hidden):
    hf = _hf_fp32(hidden, 1e-5)
    ours = RMSNorm.from_module(hf)
    assert is_llama_style(hf) and ours.weight is hf.weight  # fp32 already: the same Parameter
    x = (torch.randn(3, 37, hidden) * 3).to(dtype)
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_hf, y_ours = hf(x_hf), ours(x_ours)
    assert y_ours.dtype == dtype and torch.equal(y_ours, y_hf)
    assert torch.equal(y_ours, rms_norm_ref(x, hf.weight, 1e-5))
    dy = torch.randn_like(y_hf)
    y_hf.backward(dy)
    y_ours.backward(dy)
    if dtype == torch.bfloat16:  # one rounding of the same float32 value, up to float32 rounding before it
        differ = (x_ours.grad != x_hf.grad).float().mean().item()
        assert differ < 1e-3, f"{differ:.2%} of the bf16 input gradients differ"
        torch.testing.assert_close(x_ours.grad, x_hf.grad, rtol=1e-2, atol=1e-2)
    else:
        torch.testing.assert_close(x_ours.grad, x_hf.grad, rtol=1e-5, atol=1e-6)


def test_a_wrong_width_is_a_clear_error_not_a_fallback():
    from qlora.nn import rms_norm
    with pytest.raises(ValueError, match=r"RMSNorm\(64\) got input of shape \(2, 5, 32\)"):
        RMSNorm.from_module(_hf_fp32(64, 1e-5))(torch.randn(2, 5, 32))
    assert "cpu" not in rms_norm._UNFUSED


def test_autocast_changes_nothing():
    ours = RMSNorm.from_module(_hf_fp32(576, 1e-5))
    x = (torch.randn(4, 37, 576) * 3).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x)
    assert torch.equal(y, rms_norm_ref(x, ours.weight, 1e-5))


def test_weight_gradient_and_frozen_weight():
    hf = _hf_fp32(96, 1e-6)
    w_ref = hf.weight.detach().clone().requires_grad_()
    ours = RMSNorm.from_module(hf)
    x = torch.randn(4, 10, 96, dtype=torch.bfloat16)
    dy = torch.randn(4, 10, 96, dtype=torch.bfloat16)
    ours(x).backward(dy)
    rms_norm_ref(x, w_ref, 1e-6).backward(dy)
    torch.testing.assert_close(ours.weight.grad, w_ref.grad, rtol=1e-5, atol=1e-5)
    # frozen (as prepare_model leaves it): no weight gradient, the input's still flows
    ours.weight.requires_grad_(False)
    ours.weight.grad = None
    xg = x.clone().requires_grad_()
    ours(xg).backward(dy)
    assert ours.weight.grad is None and xg.grad is not None and torch.isfinite(xg.grad.float()).all()


def test_saves_the_input_not_a_float32_copy():
    """The op-by-op form saves x upcast to float32 (4 bytes an element); this one x itself and rstd."""
    ours = RMSNorm.from_module(_hf_fp32(128, 1e-5))
    ours.weight.requires_grad_(False)
    x = torch.randn(2, 16, 128, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ours(x)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].dtype == torch.bfloat16 and big[0].data_ptr() == x.data_ptr()
    assert all(t.numel() in (x.numel(), 128, 2 * 16) for t in saved)


def test_reference_mode_and_compile_run_the_formula(monkeypatch):
    ours = RMSNorm.from_module(_hf_fp32(64, 1e-5))
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    assert ours(x).grad_fn.name() != "ToCopyBackward0"  # the fused Function
    monkeypatch.setenv("QLORA_KERNELS", "reference")
    from qlora import kernels
    kernels.reread_mode()
    y = ours(x)
    assert y.grad_fn.name() == "ToCopyBackward0" and torch.equal(y, rms_norm_ref(x, ours.weight, 1e-5))
    compiled = torch.compile(ours, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), y)


def test_which_norms_are_llama_style():
    import importlib

    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    for arch, name in [("llama", "Llama"), ("mistral", "Mistral"), ("mixtral", "Mixtral"), ("qwen2", "Qwen2"),
                       ("qwen2_moe", "Qwen2Moe"), ("qwen3", "Qwen3"), ("qwen3_moe", "Qwen3Moe"), ("phi3", "Phi3")]:
        cls = getattr(importlib.import_module(f"transformers.models.{arch}.modeling_{arch}"), name + "RMSNorm")
        assert is_llama_style(cls(32)), arch
    assert not is_llama_style(GemmaRMSNorm(32)) and not is_llama_style(torch.nn.LayerNorm(32))

    class Renamed(LlamaRMSNorm):  # a listed name whose forward is not Llama's: left on the hooks
        def forward(self, x):
            return self.weight * x
    Renamed.__name__ = "Qwen2RMSNorm"
    assert not is_llama_style(Renamed(32))


def test_a_torch_without_the_kernel_falls_back_to_the_formula_with_one_warning(monkeypatch):
    from qlora.nn import rms_norm

    monkeypatch.setattr(rms_norm, "_UNFUSED", {})

    def missing(*args):
        raise NotImplementedError("Could not run 'aten::_fused_rms_norm' with arguments from the 'CPU' backend")
    monkeypatch.setattr(rms_norm._FusedRMSNorm, "apply", missing)
    ours = RMSNorm.from_module(_hf_fp32(64, 1e-5))
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="fused RMSNorm does not run on cpu"):
        y = ours(x)
    assert torch.equal(y, rms_norm_ref(x, ours.weight, 1e-5)) and "cpu" in rms_norm._UNFUSED
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(ours(x), y)  # no second warning
