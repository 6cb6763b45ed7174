"""ggml_blocks.decode_blocks against gguf.quants' numpy decoders (the oracle), bit for bit.

    pytest tests/model/test_ggml_blocks.py
"""
import numpy as np
import pytest
import torch
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES

from qlora.model.ggml_blocks import TYPES, decode_blocks


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_random_blocks_decode_as_gguf_quants_does(ggml_type):
    block, size = GGML_QUANT_SIZES[ggml_type]
    rng = np.random.default_rng(int(ggml_type))
    rows = rng.integers(0, 256, (6, 5 * size), dtype=np.uint8)  # 6 rows of 5 blocks: any code, any f16
    scales = rng.standard_normal((3, 5, 2)).astype(np.float16).view(np.uint8)  # [3, 5, 4]: d and m
    rows.reshape(6, 5, size)[:3, :, :4] = scales  # the first 3 rows: ordinary scales (Q8_0: two codes too)
    out = torch.empty(6, 5 * block)
    decode_blocks(torch.from_numpy(rows), ggml_type, out)
    want = torch.from_numpy(quants.dequantize(rows, ggml_type))
    torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)
    assert torch.isfinite(out[:3]).all() and out[:3].abs().sum() > 0


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_quantized_weights_round_trip_through_the_decoder(ggml_type):
    w = torch.randn(4, 96).numpy()
    rows = quants.quantize(w, ggml_type)
    out = torch.empty(4, 96)
    decode_blocks(torch.from_numpy(rows), ggml_type, out)
    assert torch.equal(out, torch.from_numpy(quants.dequantize(rows, ggml_type)))
    assert (out - torch.from_numpy(w)).abs().max() < 0.3  # it is w, to 4 or 8 bits
