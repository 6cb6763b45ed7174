"""Fuzz the safetensors reader: mutated checkpoints read as the safetensors library reads them, or raise a QloraError.

    python -m pytest tests/fuzz/test_safetensors_fuzz.py -q

The strategy and the property are in safetensors_mutations.py (shared with benchmarks/fuzz.py);
hypothesis drives the random choices here.
"""
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as reference_load
from safetensors_mutations import SEED, SafetensorsCase, raw, sections

from qlora.model.checkpoint_files import read_tensors


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> SafetensorsCase:
    return SafetensorsCase(tmp_path_factory.mktemp("safetensors_fuzz"))


def test_the_seed_reads_exactly(case):
    assert case.check(SEED) == "read"
    assert raw(dict(read_tensors(case.path))) == raw(reference_load(SEED))


def test_truncation_at_every_section_boundary_is_rejected(case):
    for cut in sections(SEED)[2][:-1]:
        assert case.check(SEED[:cut]) == "rejected"


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                                  HealthCheck.function_scoped_fixture])
@given(rng=st.randoms(use_true_random=False))
def test_mutated_files_read_right_or_raise_a_qlora_error(case, rng: random.Random):
    case(rng)
