"""Fuzz the data and recipe readers: mutated files give the seed's rows or a QloraError.

    python -m pytest tests/fuzz/test_data_fuzz.py -q

The strategy and the property are in data_mutations.py (shared with benchmarks/fuzz.py);
hypothesis drives the random choices here.
"""
import random

import pytest
from data_mutations import RECIPE, SEEDS, DataCase, RecipeCase
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def data_case(tmp_path_factory) -> DataCase:
    return DataCase(tmp_path_factory.mktemp("data_fuzz"))  # its set-up checks the seeds read exactly


@pytest.mark.parametrize("suffix", SEEDS)
def test_the_seeds_read_exactly(data_case, suffix):
    assert data_case.check(suffix, SEEDS[suffix]) == "read"


@settings(max_examples=210, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(rng=st.randoms(use_true_random=False))
def test_mutated_data_files_read_or_raise_a_qlora_error(data_case, rng: random.Random):
    data_case(rng)


@pytest.fixture(scope="module")
def recipe_case(tmp_path_factory) -> RecipeCase:
    return RecipeCase(tmp_path_factory.mktemp("recipe_fuzz"))


def test_the_recipe_seed_reads(recipe_case):
    assert recipe_case.check(RECIPE) == "read"


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(rng=st.randoms(use_true_random=False))
def test_mutated_recipes_read_or_raise_a_qlora_error(recipe_case, rng: random.Random):
    recipe_case(rng)
