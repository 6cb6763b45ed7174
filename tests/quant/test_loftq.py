"""LoftQ init: W ~ Q + B A, closer with more alternations, factors shaped as PEFT's."""
import torch

from qlora.quant.gptq import gptq_quantize
from qlora.quant.loftq import loftq_init
from qlora.quant.tensor import quantize


def _weight() -> torch.Tensor:
    low = torch.randn(128, 8) @ torch.randn(8, 192) * 0.05
    return (low + 0.02 * torch.randn(128, 192).pow(3)).bfloat16()


def _err(w, qt, A, B) -> float:
    return float((w.float() - qt.dequantize(torch.float32) - B @ A).norm())


def test_error_decreases_with_iterations_and_beats_absmax():
    w = _weight()
    plain = float((w.float() - quantize(w).dequantize(torch.float32)).norm())
    errs = [_err(w, *loftq_init(w, rank=8, iters=k)) for k in (1, 3)]
    assert errs[1] <= errs[0] < plain


def test_factors_are_peft_shaped_float32():
    w = _weight()
    qt, A, B = loftq_init(w, rank=16)
    assert A.shape == (16, 192) and B.shape == (128, 16)
    assert A.dtype == B.dtype == torch.float32 and qt.dtype == torch.bfloat16 and qt.double_quant
    # PEFT's split: B = U sqrt(S), A = sqrt(S) V^T, so the factors' row/column norms match
    assert torch.allclose(A.norm(dim=1), B.norm(dim=0), rtol=1e-4)
    qs, As, Bs = loftq_init(w, rank=16, scaling=4.0)
    assert torch.allclose(4.0 * Bs @ As, B @ A, atol=1e-5)


def test_custom_quantizer_gptq():
    w = _weight()
    H = torch.eye(192) + 0.1
    qt, A, B = loftq_init(w, rank=8, iters=2, quantizer=lambda r: gptq_quantize(r, H))
    assert qt.absmax.dtype == torch.uint8 and _err(w, qt, A, B) < float((w.float() - quantize(w).dequantize(torch.float32)).norm())
