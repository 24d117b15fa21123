"""Property-based fuzzing over random architectures (grammar: tests/fuzz_models.py).

A fixed, derandomized budget runs in CI; ``python bench/fuzz.py --examples N`` runs a longer campaign.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz_checks import check_fold_bn, check_low_rank_full_rank, check_prune
from tests.fuzz_strategies import random_nets

CI_SETTINGS = settings(max_examples=6, derandomize=True, deadline=None, database=None,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

pytestmark = pytest.mark.slow


@CI_SETTINGS
@given(model=random_nets())
def test_fold_bn_is_exact_and_keeps_the_batch_dynamic(model):
    check_fold_bn(model)


@CI_SETTINGS
@given(model=random_nets(), ratio=st.floats(0.1, 0.8), seed=st.integers(0, 1000))
def test_prune_is_mask_equivalent_at_random_ratios(model, ratio, seed):
    check_prune(model, ratio, seed)


@CI_SETTINGS
@given(model=random_nets())
def test_low_rank_at_full_rank_is_exact(model):
    check_low_rank_full_rank(model)
