"""IWDFT: batch form = the spec's formula, recursive form = batch form, slots = folded sums."""
import math
import random

import pytest
import torch

from faedkv import iwdft, iwdft_slots, iwdft_update
from faedkv.iwdft import symmetric_keep

SHAPES = [((37, 8), 5), ((2, 3, 64, 16), 64), ((1, 2, 100, 4), 7), ((3, 9, 3), 11), ((2, 50, 6), 1)]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def formula(x: torch.Tensor, num_bins: int) -> torch.Tensor:
    """S_t[k] = (1/t) sum_n x_n exp(-2 pi i k (t - n + 1) / M), evaluated directly in float64."""
    t = x.shape[-2]
    n = torch.arange(1, t + 1, dtype=torch.float64)
    k = torch.arange(num_bins, dtype=torch.float64)
    phase = torch.exp(-2j * math.pi * k[:, None] * (t - n[None, :] + 1) / num_bins)
    return torch.einsum("kn,...nd->...kd", phase, x.double().to(torch.complex128)) / t


def rel(a, b):
    return float((a.to(torch.complex128) - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,bins", SHAPES)
def test_batch_form_equals_formula(shape, bins, dtype):
    x = torch.randn(shape).to(dtype)
    state = iwdft(x, bins)
    assert state.shape == shape[:-2] + (bins, shape[-1])
    assert state.dtype == (torch.complex128 if dtype == torch.float64 else torch.complex64)
    assert rel(state, formula(x, bins)) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,bins", SHAPES)
def test_recursive_form_equals_batch(shape, bins, dtype):
    x = torch.randn(shape).to(dtype)
    tokens = shape[-2]
    start = random.randrange(0, tokens)  # any prefix in batch form, the rest one token at a time
    if start == 0:
        state = torch.zeros(shape[:-2] + (bins, shape[-1]), dtype=iwdft(x[..., :1, :], bins).dtype)
    else:
        state = iwdft(x[..., :start, :], bins)
    for t in range(start, tokens):
        state = iwdft_update(state, x[..., t, :], t)
        assert rel(state, formula(x[..., : t + 1, :], bins)) < 1e-5, (start, t)
    assert rel(state, iwdft(x, bins).to(torch.complex128)) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,bins", SHAPES)
def test_all_bins_kept_slots_are_folded_sums(shape, bins, dtype):
    x = torch.randn(shape).to(dtype)
    tokens = shape[-2]
    slots = iwdft_slots(iwdft(x, bins), torch.ones(bins, dtype=torch.bool))
    assert not slots.is_complex() and slots.shape == shape[:-2] + (bins, shape[-1])
    expected = torch.zeros(slots.shape, dtype=torch.float64)
    for n in range(1, tokens + 1):  # token n has distance t - n + 1 from the newest token
        expected[..., (tokens - n + 1) % bins, :] += x[..., n - 1, :].double()
    expected *= bins / tokens
    assert torch.allclose(slots.double(), expected, atol=1e-5 * expected.abs().max().item())
    assert torch.equal(iwdft_slots(iwdft(x, bins)), slots)  # keep=None keeps every bin


def test_keep_is_completed_to_conjugate_symmetry():
    bins = random.choice([8, 9, 16, 31])
    x = torch.randn(2, 40, 5)
    state = iwdft(x, bins)
    k = random.randrange(1, bins // 2)
    one_side = torch.zeros(bins, dtype=torch.bool)
    one_side[k] = True
    both = one_side.clone()
    both[bins - k] = True
    assert torch.equal(symmetric_keep(one_side), both)
    slots = iwdft_slots(state, one_side)
    assert torch.allclose(slots, iwdft_slots(state, both))
    # Only bins +-k survive: the slots' own DFT is zero elsewhere.
    spectrum = torch.fft.fft(slots.double(), dim=-2).abs().amax(dim=(0, 2))
    assert spectrum[~both].max() < 1e-4 * spectrum[both].max()


def test_per_head_keep_masks_broadcast():
    x = torch.randn(2, 3, 50, 4)
    bins = 10
    keep = torch.rand(3, bins) > 0.5
    keep[:, 0] = True
    slots = iwdft_slots(iwdft(x, bins), keep)
    for head in range(3):
        alone = iwdft_slots(iwdft(x[:, head], bins), keep[head])
        assert torch.allclose(slots[:, head], alone, atol=1e-6)


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="num_bins"):
        iwdft(torch.randn(10, 3), 0)
    with pytest.raises(ValueError, match="real floating"):
        iwdft(torch.ones(10, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="bins"):
        iwdft_slots(iwdft(torch.randn(10, 3), 4), torch.ones(5, dtype=torch.bool))
