"""Fuzz the adapter reader: a mutated adapter directory loads consistent LoRA layers onto its base or raises a QloraError.

    python -m pytest tests/fuzz/test_adapter_fuzz.py -q

The strategy and the property are in adapter_mutations.py (shared with benchmarks/fuzz.py);
hypothesis drives the random choices here.
"""
import json
import random

import pytest
from adapter_mutations import BAD_VALUES, ODD_VALUES, AdapterCase
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> AdapterCase:
    return AdapterCase(tmp_path_factory.mktemp("adapter_fuzz"))  # its set-up loads the seed


def test_the_seed_loads_exactly(case):
    assert case.check(case.config, case.weights) == "equal"


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_every_bad_config_value_is_rejected(case, key):
    for value in BAD_VALUES[key]:
        config = json.loads(case.config) | {key: value}
        assert case.check(json.dumps(config).encode(), case.weights) == "rejected", (key, value)


@pytest.mark.parametrize("key", sorted(ODD_VALUES))
def test_odd_config_values_hold_the_property(case, key):
    for value in ODD_VALUES[key]:
        case.check(json.dumps(json.loads(case.config) | {key: value}).encode(), case.weights)


@settings(max_examples=125, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(rng=st.randoms(use_true_random=False))
def test_mutated_adapters_load_consistently_or_raise_a_qlora_error(case, rng: random.Random):
    case(rng)
