"""Fuzz the GGUF reader: mutated copies of a valid seed read equal or raise GGUFError, in bounded memory.

    python -m pytest tests/fuzz -q

The strategy (gguf_mutations.py) is shared with `benchmarks/fuzz.py --cases N`, which runs it
as a plain loop for longer. Here: hypothesis drives the random mutations (250 examples), and
every truncation boundary and every header field x every interesting value run exhaustively.
"""
from __future__ import annotations

import random

import pytest
from gguf_mutations import INTERESTING, GGUFCase, overwrite, truncate
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> GGUFCase:
    return GGUFCase(tmp_path_factory.mktemp("gguf_fuzz"))


def test_the_seed_reads_equal(case):
    assert case.check(case.blob, exact=True) == "equal"
    # the walker found every field: 3 counts + 6 keys x (length, bytes, type) + 2 x (item type, count)
    # + 4 strings x (length, bytes) + 4 tensors x (name length, bytes, n_dims, type, offset) + 7 dims
    assert len(case.fields) == 3 + 18 + 4 + 8 + 20 + 7


def test_truncation_at_every_boundary_raises_or_reads_equal(case):
    cuts = sorted({at for f in case.fields for at in (f.offset, f.offset + f.width)} | set(range(0, 24)))
    outcomes = [case.check(truncate(case.blob, at), exact=True) for at in cuts]
    assert set(outcomes) == {"rejected"}  # every cut inside the header
    assert case.check(truncate(case.blob, max(t.offset + t.nbytes for t in case.seed.tensors.values())),
                      exact=True) == "equal"  # only the last tensor's padding is gone


@pytest.mark.parametrize("value", INTERESTING)
def test_every_header_field_overwritten(case, value):
    for field in case.fields:
        if field.kind != "string":
            case.check(overwrite(case.blob, field, value), exact=False)


@settings(max_examples=250, deadline=None, database=None)
@given(rng=st.randoms(use_true_random=False))
def test_random_mutations_raise_gguf_error_or_read(case, rng: random.Random):
    case(rng)
