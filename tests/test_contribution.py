"""Token contribution: IWDFT is flat for any keep-mask, iterative DCT and eviction are not."""
import random

import pytest
import torch

from faedkv import FrequencyPlan, compression_matrix, contribution_profile, equality_summary
from faedkv.contribution import gini
from faedkv.budget import kept_rows
from faedkv.variants import slot_mass


def test_profile_is_the_normalised_column_weight_of_the_attention_equivalent_map():
    gen = torch.Generator().manual_seed(5)
    matrix, mass = torch.randn(5, 12, generator=gen), torch.randint(1, 4, (5,), generator=gen)
    profile = contribution_profile(matrix, mass)
    # the expanded map repeats row m mass_m times
    expanded = matrix.double().repeat_interleave(mass, dim=0)
    weights = expanded.abs().sum(dim=0)
    assert torch.allclose(profile, weights / weights.max())
    assert profile.max() == 1.0
    assert torch.allclose(contribution_profile(matrix), matrix.double().abs().sum(0) / matrix.double().abs().sum(0).max())


def test_summary_of_known_profiles():
    flat = equality_summary(torch.ones(50))
    assert flat == pytest.approx({"one_minus_gini": 1.0, "oldest_over_newest": 1.0, "min_over_max": 1.0})
    ramp = torch.linspace(0.1, 1.0, 100)
    summary = equality_summary(ramp)
    assert summary["oldest_over_newest"] == pytest.approx(ramp[:10].mean() / ramp[-10:].mean())
    assert summary["min_over_max"] == pytest.approx(0.1)
    assert gini(torch.tensor([0.0, 0.0, 0.0, 1.0])) == pytest.approx(0.75)


def test_iwdft_with_its_mass_is_flat_and_without_it_is_not():
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    tokens, ratio = rng.randint(40, 200), rng.choice([0.5, 0.75, 0.9])
    slots = kept_rows(tokens, ratio)
    if tokens % slots == 0:
        tokens += 1                   # unequal classes: some hold one token more
        slots = kept_rows(tokens, ratio)
    matrix = compression_matrix("iwdft", tokens, num_slots=slots)
    flat = equality_summary(contribution_profile(matrix, slot_mass("iwdft", tokens, slots)))
    assert flat["one_minus_gini"] == pytest.approx(1.0, abs=1e-12), seed
    assert flat["min_over_max"] == pytest.approx(1.0, abs=1e-12), seed
    unequal = equality_summary(contribution_profile(matrix))
    counts = torch.bincount((tokens - torch.arange(tokens)) % slots, minlength=slots)
    assert unequal["min_over_max"] == pytest.approx(counts.min().item() / counts.max().item()), seed
    assert unequal["min_over_max"] < 1, seed


def test_a_plan_keeps_iwdft_nearly_flat():
    """Band-limited class means weigh their tokens through a signed filter: exactly flat when
    every class holds as many tokens, within a few percent otherwise."""
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    chunks = 22
    tokens, ratio = rng.randint(40, 200), rng.choice([0.5, 0.75, 0.9])
    while True:
        plan = FrequencyPlan(layers=[sorted(rng.sample(range(chunks), rng.randint(1, chunks)))])
        if plan.mask(0, kept_rows(tokens, ratio)).any():
            break
    slots = kept_rows(tokens, ratio)
    summary = equality_summary(contribution_profile(
        compression_matrix("iwdft", tokens, ratio, plan=plan), slot_mass("iwdft", tokens, slots)))
    if tokens % slots == 0:
        assert summary["one_minus_gini"] == pytest.approx(1.0, abs=1e-9), seed
    # measured over 24 draws (N 137-251, ratios 0.5-0.9): 1 - Gini 0.984-0.996
    assert summary["one_minus_gini"] > 0.97, (seed, summary)


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
