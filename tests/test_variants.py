"""The three variants: linear maps with the documented properties."""
import random

import pytest
import torch

from faedkv import FrequencyPlan, compression_matrix
from faedkv.iwdft import fold_by_distance, fold_counts
from faedkv.budget import kept_rows
from faedkv.variants import (VARIANTS, compress, dct_iterative_expand, expand, idct, dct2,
                             slot_positions)


def random_plan(tokens, ratio, chunks=22):
    """A random one-layer plan that keeps at least one of the compression's M bins.

    With few slots a chunk can hold no bin, and a plan keeping none is refused (test_plans)."""
    while True:
        plan = FrequencyPlan(layers=[sorted(random.sample(range(chunks), random.randint(1, chunks - 1)))])
        if plan.mask(0, kept_rows(tokens, ratio)).any():
            return plan


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_old_sum_slots_have_equal_column_norms_for_any_keep_mask(ratio):
    """The spec's first reading, (M/t) x class sums through a plan: a unitary-like map."""
    tokens = random.randint(30, 300)
    for plan in (None, random_plan(tokens, ratio), random_plan(tokens, ratio)):
        norms = compression_matrix("iwdft", tokens, ratio, plan=plan, normalization="sum").norm(dim=0)
        assert torch.allclose(norms, norms.mean().expand_as(norms), rtol=1e-10), plan


def test_fold_counts_are_the_distance_histogram():
    """The closed form against its definition: how many of the distances 1..T are b mod M."""
    for _ in range(50):
        tokens, bins = random.randint(0, 5000), random.randint(1, 700)
        expected = torch.bincount(torch.arange(1, tokens + 1) % bins, minlength=bins)
        assert torch.equal(fold_counts(tokens, bins), expected), (tokens, bins)
    with pytest.raises(ValueError, match="num_bins >= 1"):
        fold_counts(10, 0)


def test_mean_slots_are_class_means():
    tokens = random.randint(30, 300)
    slots = kept_rows(tokens, random.choice([0.5, 0.8]))
    matrix = compression_matrix("iwdft", tokens, num_slots=slots)
    counts = fold_counts(tokens, slots).double()
    member = (tokens - torch.arange(tokens)) % slots           # token i's class (distance mod M)
    expected = torch.zeros(slots, tokens, dtype=torch.float64)
    expected[member, torch.arange(tokens)] = 1 / counts[member]
    assert torch.allclose(matrix, expected, atol=1e-12)
    assert torch.allclose(matrix.sum(dim=1), torch.ones(slots, dtype=torch.float64))


def test_dct_iterative_columns_are_not_equal_after_several_recompressions():
    tokens, step = random.randint(200, 400), random.choice([8, 16])
    norms = compression_matrix("dct-iterative", tokens, 0.75, step=step).norm(dim=0)
    # old tokens went through (N - M) / step compressions; the newest through one
    assert norms[: tokens // 10].mean() < 0.8 * norms[-tokens // 10:].mean()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matrix_is_the_map_applied_to_data(variant, dtype):
    tokens, ratio = random.randint(50, 150), random.choice([0.3, 0.75])
    plan = random_plan(tokens, ratio)
    matrix = compression_matrix(variant, tokens, ratio, plan=plan, step=10)
    x = torch.randn(2, 3, tokens, 8).to(dtype)
    keep = (lambda f: plan.keep_frequencies(0, f))
    slots = compress(variant, x, matrix.shape[0], keep, step=10)
    expected = torch.einsum("mn,bhnd->bhmd", matrix, x.double())
    assert torch.allclose(slots.double(), expected, atol=1e-4 * expected.abs().max().item())
    assert slots.dtype == torch.float32


@pytest.mark.parametrize("variant", ["resample", "dct-iterative"])
def test_as_many_slots_as_tokens_is_identity(variant):
    x = torch.randn(2, random.randint(10, 90), 6, dtype=torch.float64)
    assert torch.allclose(compress(variant, x, x.shape[-2]), x, atol=1e-10)


def test_iwdft_with_as_many_bins_as_tokens_is_a_permutation():
    x = torch.randn(3, random.randint(10, 90), 6, dtype=torch.float64)
    slots = compress("iwdft", x, x.shape[-2])
    assert torch.allclose(expand("iwdft", slots, x.shape[-2]), x, atol=1e-10)
    assert torch.allclose(slots.sort(dim=-2).values, x.sort(dim=-2).values, atol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
def test_constant_sequence_stays_constant(variant):
    value = random.uniform(-3, 3)
    x = torch.full((2, random.randint(40, 200), 3), value, dtype=torch.float64)
    slots = compress(variant, x, random.randint(5, 30), step=7)
    assert torch.allclose(slots, torch.full_like(slots, value), atol=1e-9)


def test_dct_pair_is_inverse():
    x = torch.randn(4, random.randint(2, 100), 5, dtype=torch.float64)
    assert torch.allclose(idct(dct2(x)), x, atol=1e-10)


def test_expansion_is_the_pseudo_inverse_when_every_bin_is_kept():
    tokens = random.randint(60, 160)
    for variant in ("iwdft", "resample"):
        matrix = compression_matrix(variant, tokens, 0.6)
        # expand(A x) = A^+ A x: the least-squares reconstruction from the slots
        x = torch.randn(tokens, 1, dtype=torch.float64)
        assert torch.allclose(expand(variant, matrix @ x, tokens),
                              torch.linalg.pinv(matrix) @ (matrix @ x), atol=1e-8), variant
    # dct-iterative: one re-compression (N = M + step) is undone by its pseudo-inverse exactly
    step, slots_n = 9, random.randint(20, 50)
    matrix = compression_matrix("dct-iterative", slots_n + step, 1 - slots_n / (slots_n + step), step=step)
    x = torch.randn(slots_n + step, 1, dtype=torch.float64)
    assert torch.allclose(dct_iterative_expand(matrix @ x, slots_n + step, step),
                          torch.linalg.pinv(matrix) @ (matrix @ x), atol=1e-8)


def test_slot_positions():
    tokens, slots = random.randint(50, 300), random.randint(5, 40)
    iw = slot_positions("iwdft", tokens, slots)
    index = torch.arange(tokens, dtype=torch.float64)[:, None]
    assert torch.allclose(iw, fold_by_distance(index, slots)[:, 0] / fold_counts(tokens, slots))
    assert torch.allclose(slot_positions("resample", tokens, slots),
                          torch.arange(slots, dtype=torch.float64) * tokens / slots)
    dct = slot_positions("dct-iterative", tokens, slots, 8)
    assert (dct.diff() > 0).all() and 0 <= dct[0] and dct[-1] < tokens


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown variant"):
        compression_matrix("fft", 10, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        compression_matrix("iwdft", 10, 1.0)
    with pytest.raises(ValueError, match="per head"):
        compression_matrix("iwdft", 10, 0.5, plan=FrequencyPlan(layers=[[[0], [1]]]))
