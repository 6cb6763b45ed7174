"""Code books: the NF4 table and its derivation, FP4/INT4, the 8-bit dynamic maps."""
import bitsandbytes.functional as bnbF
import pytest
import torch

from qlora.quant import codebooks as cb

NF4_TABLE = [  # formats.md section 1, as printed there
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def test_nf4_table_matches_reference_document():
    assert torch.equal(cb.NF4, torch.tensor(NF4_TABLE, dtype=torch.float32))


def test_nf4_derivation_reproduces_table_bit_for_bit():
    derived = cb.derive_nf4()
    assert derived.dtype == torch.float32
    assert torch.equal(derived.view(torch.int32), cb.NF4.view(torch.int32))


def test_nf4_derivation_depends_on_offset():
    assert not torch.equal(cb.derive_nf4(0.99), cb.NF4)


def test_nf4_has_exact_zero_and_is_sorted():
    assert (cb.NF4 == 0).sum() == 1
    assert torch.all(cb.NF4[1:] > cb.NF4[:-1])


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_4bit_tables_match_bitsandbytes(qt):
    assert torch.equal(cb.codebook(qt), bnbF.get_4bit_type(qt, device="cpu"))


def test_int4_is_absmax_integers():
    assert torch.equal(cb.INT4 * 7, torch.arange(-8, 8, dtype=torch.float32))


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_maps_match_bitsandbytes(signed):
    ours = cb.dynamic_map(signed)
    assert torch.equal(ours, bnbF.create_dynamic_map(signed=signed))
    assert ours.numel() == 256 and ours[-1] == 1.0


def test_signed_map_endpoints():
    m = cb.signed_dynamic_map()
    assert m[0].item() == pytest.approx(-0.99296875) and m[127] == 0 and m[255] == 1.0


def test_unknown_quant_type():
    with pytest.raises(ValueError, match="nf3"):
        cb.codebook("nf3")
