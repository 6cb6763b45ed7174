"""Fuzz the pre-quantized checkpoint reader: a mutated `qlora quantize` output loads 4-bit layers that decode, or raises a QloraError.

    python -m pytest tests/fuzz/test_bnb_fuzz.py -q

The strategy and the property are in bnb_mutations.py (shared with benchmarks/fuzz.py);
hypothesis drives the random choices here.
"""
import json
import random

import pytest
from bnb_mutations import QUANT_CONFIG_VALUES, STATE_ODD, STATE_VALUES, BnbCase, set_state
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> BnbCase:
    return BnbCase(tmp_path_factory.mktemp("bnb_fuzz"))  # its set-up loads the seed


def test_the_seed_loads_exactly(case):
    assert case.check(case.config, case.weights) == "equal"


def _with_state(case: BnbCase, field: str, value) -> bytes:
    tensors = dict(case.tensors)
    set_state(tensors, "model.layers.0.self_attn.q_proj.weight", field, value)
    return save(tensors, metadata={"format": "pt"})


@pytest.mark.parametrize("field", sorted(STATE_VALUES))
def test_every_bad_quant_state_value_is_refused(case, field):
    for value in STATE_VALUES[field]:
        assert case.check(case.config, _with_state(case, field, value)) == "rejected", (field, value)


def test_odd_but_valid_quant_state_values_decode(case):
    for field, values in STATE_ODD.items():
        for value in values:
            assert case.check(case.config, _with_state(case, field, value)) == "changed", (field, value)


@pytest.mark.parametrize("key", sorted(QUANT_CONFIG_VALUES))
def test_quantization_config_values_hold_the_property(case, key):
    for value in QUANT_CONFIG_VALUES[key]:
        config = json.loads(case.config)
        config["quantization_config"][key] = value
        case.check(json.dumps(config).encode(), case.weights)


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(rng=st.randoms(use_true_random=False))
def test_mutated_checkpoints_load_consistently_or_raise_a_qlora_error(case, rng: random.Random):
    case(rng)
