"""The pure-PyTorch reference against bitsandbytes (quantization) and the formula (decoding)."""
import bitsandbytes.functional as bnbF
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qlora
from qlora.quant import blockwise
from qlora.quant.codebooks import NF4, codebook

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _tensor(n: int, dtype: torch.dtype, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * scale).to(dtype)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 5000),
    blocksize=st.sampled_from([32, 64, 128, 256, 1024, 4096]),
    dtype=st.sampled_from(DTYPES),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31),
)
def test_quantize_bit_exact_with_bitsandbytes(n, blocksize, dtype, quant_type, double_quant, scale, seed):
    x = _tensor(n, dtype, scale, seed)
    ours = qlora.quantize(x, quant_type, blocksize, double_quant)
    packed, state = bnbF.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)
    assert torch.equal(ours.data.view(-1), packed.view(-1))
    assert torch.equal(ours.absmax, state.absmax)
    if double_quant:
        assert torch.equal(ours.nested_absmax, state.state2.absmax)
        assert torch.equal(ours.nested_code, state.state2.code)
        assert ours.nested_offset == state.offset.item()
        assert torch.equal(ours.scales(), bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3000), blocksize=st.sampled_from([32, 64, 512]), seed=st.integers(0, 2**31),
       out_dtype=st.sampled_from(DTYPES), quant_type=st.sampled_from(["nf4", "fp4", "int4"]))
def test_decode_is_the_formula(n, blocksize, seed, out_dtype, quant_type):
    """out[i] = code[nibble_i] * absmax[i // blocksize], float32 product rounded once."""
    x = _tensor(n, torch.float32, 1.0, seed)
    qt = qlora.quantize(x, quant_type, blocksize, double_quant=False)
    nibbles = []
    for byte in qt.data.view(-1).tolist():
        nibbles += [byte >> 4, byte & 0xF]
    code = codebook(quant_type)
    expected = torch.stack([code[nibbles[i]] * qt.absmax[i // blocksize] for i in range(n)]).to(out_dtype)
    assert torch.equal(qt.dequantize(out_dtype), expected)


def test_decode_matches_bitsandbytes_where_its_decoder_is_right():
    x = torch.randn(64, 128)  # rows a multiple of the blocksize: bnb's CPU decoder is correct here
    packed, state = bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = qlora.quantize(x, "nf4", 64, True)
    assert torch.equal(ours.dequantize(torch.float32), bnbF.dequantize_4bit(packed, state))


def test_nearest_code_ties_go_low():
    mid = (NF4[7] + NF4[8]) / 2  # exactly between code 7 (0.0) and code 8
    assert blockwise.nearest(mid.view(1), NF4).item() == 7
    assert blockwise.nearest(torch.nextafter(mid, torch.tensor(1.0)).view(1), NF4).item() == 8


def test_all_zero_block_decodes_to_zero():
    x = torch.zeros(200)
    x[:64] = torch.randn(64)
    qt = qlora.quantize(x, "nf4", 64, double_quant=False)
    assert torch.equal(qt.dequantize()[64:], torch.zeros(136))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_roundtrip_error_is_bounded_by_half_the_largest_gap(quant_type):
    x = torch.randn(4096)
    qt = qlora.quantize(x, quant_type, 64, double_quant=False)
    code = codebook(quant_type).sort().values
    max_gap = (code[1:] - code[:-1]).max()
    err = (qt.dequantize() - x).abs().view(-1, 64) / qt.absmax.view(-1, 1)
    assert err.max() <= max_gap / 2 + 1e-6
