"""Token contribution: IWDFT is flat for any keep-mask, iterative DCT and eviction are not."""
import random

import pytest
import torch

from faedkv import FrequencyPlan, compression_matrix, contribution_profile, equality_summary
from faedkv.contribution import gini
from faedkv.variants import num_slots_for


def test_profile_is_normalised_column_norms():
    matrix = torch.randn(5, 12)
    profile = contribution_profile(matrix)
    norms = matrix.double().norm(dim=0)
    assert torch.allclose(profile, norms / norms.max())
    assert profile.max() == 1.0


def test_summary_of_known_profiles():
    flat = equality_summary(torch.ones(50))
    assert flat == pytest.approx({"one_minus_gini": 1.0, "oldest_over_newest": 1.0, "min_over_max": 1.0})
    ramp = torch.linspace(0.1, 1.0, 100)
    summary = equality_summary(ramp)
    assert summary["oldest_over_newest"] == pytest.approx(ramp[:10].mean() / ramp[-10:].mean())
    assert summary["min_over_max"] == pytest.approx(0.1)
    assert gini(torch.tensor([0.0, 0.0, 0.0, 1.0])) == pytest.approx(0.75)


def test_iwdft_is_flat_for_any_plan():
    chunks = 22
    tokens, ratio = random.randint(40, 200), random.choice([0.5, 0.75, 0.9])
    # With few slots a chunk can hold no bin: draw plans that keep at least one of the M bins
    # (a plan keeping none zeroes the middle, and every contribution is 0).
    while True:
        plan = FrequencyPlan(layers=[sorted(random.sample(range(chunks), random.randint(1, chunks)))])
        if plan.mask(0, num_slots_for(tokens, ratio)).any():
            break
    summary = equality_summary(contribution_profile(
        compression_matrix("iwdft", tokens, ratio, plan=plan)))
    assert summary["one_minus_gini"] == pytest.approx(1.0, abs=1e-9)
    assert summary["min_over_max"] == pytest.approx(1.0, abs=1e-9)


def test_eviction_and_iterative_compression_are_not_flat():
    tokens, ratio = 300, 0.75
    dct = equality_summary(contribution_profile(compression_matrix("dct-iterative", tokens, ratio, step=16)))
    assert dct["oldest_over_newest"] < 0.8 and dct["one_minus_gini"] < 0.95
    kept = round((1 - ratio) * tokens)
    streaming = torch.zeros(kept, tokens, dtype=torch.float64)  # keep the newest tokens
    streaming[torch.arange(kept), torch.arange(tokens - kept, tokens)] = 1
    evict = equality_summary(contribution_profile(streaming))
    assert evict["oldest_over_newest"] == 0.0 and evict["min_over_max"] == 0.0


def test_bad_inputs():
    with pytest.raises(ValueError):
        contribution_profile(torch.ones(3))
    with pytest.raises(ValueError):
        equality_summary(torch.tensor([-1.0, 1.0]))
