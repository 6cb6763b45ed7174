"""The two 8-bit quantizers against their references (bitsandbytes for the grid, brute force
for the nearest code) and the decoder against its formula."""
import bitsandbytes.functional as bnbF
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlora.quant.blockwise8 import dequantize_8bit, nearest_code, quantize_8bit_grid, quantize_8bit_nearest
from qlora.quant.codebooks import signed_dynamic_map, unsigned_dynamic_map


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**31), shift=st.floats(-5, 5))
def test_8bit_quantize_bit_exact_with_bitsandbytes(n, seed, shift):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) + shift
    q, absmax = quantize_8bit_grid(x, signed_dynamic_map(), 256)
    q_bnb, state = bnbF.quantize_blockwise(x, blocksize=256)
    assert torch.equal(q, q_bnb) and torch.equal(absmax, state.absmax)
    assert torch.equal(dequantize_8bit(q, absmax, signed_dynamic_map(), 256), bnbF.dequantize_blockwise(q_bnb, state))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [256 * 40, 256 * 7 + 13, 100])
def test_quantize_picks_the_nearest_code_per_block(signed, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.logspace(-4, 2, n)  # blocks of very different scales
    if not signed:
        x = x.abs()
    q, absmax = quantize_8bit_nearest(x, signed)
    assert q.dtype == torch.uint8 and q.shape == (n,)
    assert absmax.dtype == torch.float32 and absmax.shape == (-(-n // 256),)
    pad = torch.cat([x, x.new_zeros(-n % 256)]).view(-1, 256)
    assert torch.equal(absmax, pad.abs().amax(1))
    table = signed_dynamic_map() if signed else unsigned_dynamic_map()
    scaled = (pad / pad.abs().amax(1, keepdim=True)).reshape(-1)[:n]
    brute = (scaled.double()[:, None] - table.double()[None, :]).abs().argmin(1)  # first = lower code
    assert torch.equal(q.long(), brute)
    # decoding is the formula code[q] * absmax[block]
    expected = table[q.long()] * absmax.repeat_interleave(256)[:n]
    assert torch.equal(dequantize_8bit(q, absmax, table), expected)


@pytest.mark.parametrize("signed", [True, False])
def test_bucket_table_equals_bucketize_on_the_midpoints(signed):
    table = signed_dynamic_map() if signed else unsigned_dynamic_map()
    mids = (table[:-1] + table[1:]) / 2
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    hard = torch.cat([
        mids, torch.nextafter(mids, up), torch.nextafter(mids, down), table,
        torch.nextafter(table, up), torch.nextafter(table, down),
        torch.tensor([0.0, -0.0, 1.0, -1.0, 1.0000001, -1.0000001, 1e-45, -1e-45, 1e-38]),
    ])
    g = torch.Generator().manual_seed(0)
    wide = (torch.rand(200_000, generator=g) * 2 - 1) * 10 ** (-9 * torch.rand(200_000, generator=g))
    for x in (hard, wide):
        assert torch.equal(nearest_code(x, signed).long(), torch.bucketize(x, mids))
    with pytest.raises(ValueError, match="contiguous float32"):
        nearest_code(wide.double(), signed)


def test_zero_blocks_stay_zero_and_write_in_place():
    x = torch.zeros(600)
    x[300:] = torch.randn(300)
    q = torch.empty(600, dtype=torch.uint8)
    absmax = torch.empty(3)
    out_q, out_a = quantize_8bit_nearest(x, True, q, absmax)
    assert out_q is q and out_a is absmax
    y = dequantize_8bit(q, absmax, signed_dynamic_map())
    assert torch.equal(y[:256], torch.zeros(256)) and absmax[0] == 0
    assert ((y - x).abs() <= 0.03 * x.abs().max()).all()
    with pytest.raises(ValueError, match="flat float32"):
        quantize_8bit_nearest(x.view(20, 30), True)
    with pytest.raises(ValueError, match="600 codes need 3 scales, got 2"):
        dequantize_8bit(q, absmax[:2], signed_dynamic_map())
