"""The Infinite-Window DFT (IWDFT) of the spec, in batch, recursive and inverse form.

For middle tokens x_1..x_t and M bins the state is

    S_t[k] = (1/t) * sum_{n=1..t} x_n * exp(-2*pi*i * k * (t - n + 1) / M),   k = 0..M-1

so the phase is referenced to the newest token, whose "distance" t - n + 1 is 1. The batch form
folds the tokens by distance mod M (one reshape-sum) and takes an M-point FFT over the folded
bins: O(t*d + M log M * d), never an O(t*M*d) loop.
"""
from __future__ import annotations

import math

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float (bf16, fp16, fp32) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def fold_by_distance(x: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Sum of the tokens whose distance from the newest token is congruent to b mod num_bins.

    x: (..., tokens, head_dim) -> (..., num_bins, head_dim) in x's compute dtype (float32 for
    bf16/fp16); bin b holds the tokens with t - n + 1 = b (mod M) for token n = 1..t (newest
    token: distance 1, bin 1 mod M).
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    tokens = x.shape[-2]
    ring = fold_by_index(x, num_bins)
    # Index i (0-based) has distance t - i, so bin b is ring row (t - b) mod M: a permutation of
    # M rows, cheaper than flipping all t tokens.
    rows = (tokens - torch.arange(num_bins, device=x.device)) % num_bins
    return ring.index_select(-2, rows)


def fold_by_index(x: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Ring fold: row r sums the tokens with 0-based index i = r (mod num_bins).

    x: (..., tokens, head_dim) -> (..., num_bins, head_dim) float32 (float64 for float64 input).
    Reads x once: full periods in one reshape-sum accumulating in the compute dtype, then the
    remainder added to the first rows.
    """
    tokens, dim = x.shape[-2], x.shape[-1]
    periods, remainder = divmod(tokens, num_bins)
    dtype = compute_dtype(x.dtype)
    if periods == 0:
        ring = x.new_zeros(x.shape[:-2] + (num_bins, dim), dtype=dtype)
    else:
        full = x[..., : periods * num_bins, :].reshape(x.shape[:-2] + (periods, num_bins, dim))
        ring = full.sum(dim=-3, dtype=dtype)
    if remainder:
        ring[..., :remainder, :] += x[..., periods * num_bins:, :].to(dtype)
    return ring


def fold_counts(tokens: int, num_bins: int) -> torch.Tensor:
    """How many of the distances 1..tokens fall into each bin d mod num_bins, (num_bins,) int64.

    Closed form (O(num_bins), no pass over the tokens): with tokens = lap M + rem, bins 1..rem
    hold lap + 1 distances and the others lap."""
    if tokens < 0 or num_bins < 1:
        raise ValueError(f"fold_counts needs tokens >= 0 and num_bins >= 1, got {tokens} and {num_bins}")
    lap, rem = divmod(tokens, num_bins)
    counts = torch.full((num_bins,), lap, dtype=torch.int64)
    counts[1:rem + 1] += 1
    return counts


def ring_slot_scales(tokens: int, num_bins: int) -> tuple[int, float, float]:
    """(filled, more, less) after `tokens` tokens filled M = num_bins ring rows in turn: rows
    r < filled hold one token more than the others, and mean_r * (more if r < filled else less)
    = mean_r * count_r * M / t is the spec's first reading of a slot, (M / t) times the row's sum
    (the old normalisation)."""
    lap, filled = divmod(tokens, num_bins)
    scale = num_bins / tokens
    return filled, (lap + 1) * scale, lap * scale


def ring_log_counts(tokens: int, num_bins: int) -> tuple[int, float, float]:
    """(filled, more, less) after `tokens` tokens filled M = num_bins ring rows in turn: rows
    r < filled hold lap + 1 tokens, the others lap, and their logits get + log(count) (more,
    less; a row without tokens gets -1e30, so it takes no attention)."""
    lap, filled = divmod(tokens, num_bins)
    return filled, math.log(lap + 1), math.log(lap) if lap else -1e30


def band_limit(x: torch.Tensor, half_mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """irfft(rfft(x) * half_mask) along dim: x's circular convolution with the real, even
    kernel irfft(half_mask) (a conjugate-symmetric mask's rfft half), i.e. x times the symmetric
    circulant C = F^-1 diag(mask) F. Real x (..., M, ...), half_mask broadcastable to the rfft
    (..., M//2 + 1, ...) along dim."""
    size = x.shape[dim]
    return torch.fft.irfft(torch.fft.rfft(x, dim=dim) * half_mask, n=size, dim=dim)


def iwdft(x: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Batch IWDFT: real (..., tokens, head_dim) -> complex (..., num_bins, head_dim).

    complex128 for float64 input, complex64 otherwise (bf16/fp16 are computed in float32).
    """
    if not x.is_floating_point():
        raise ValueError(f"iwdft needs a real floating tensor, got {x.dtype}")
    tokens = x.shape[-2]
    if tokens < 1:
        raise ValueError("iwdft needs at least one token")
    folded = fold_by_distance(x.to(compute_dtype(x.dtype)), num_bins)
    return torch.fft.fft(folded, dim=-2) / tokens


def twiddles(num_bins: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """W_k = exp(-2*pi*i*k/M), (num_bins,) complex; computed in float64, then cast."""
    k = torch.arange(num_bins, dtype=torch.float64, device=device)
    return torch.polar(torch.ones_like(k), -2 * math.pi * k / num_bins).to(dtype)


def iwdft_update(state: torch.Tensor, x_new: torch.Tensor, t: int) -> torch.Tensor:
    """The state after t tokens plus one more token -> the state after t + 1 tokens.

    state: complex (..., num_bins, head_dim); x_new: real (..., head_dim); t >= 0 tokens so far.
    S_{t+1}[k] = W_k * ((t/(t+1)) * S_t[k] + x_new / (t+1)).
    """
    if t < 0:
        raise ValueError(f"t (tokens already in the state) must be >= 0, got {t}")
    num_bins = state.shape[-2]
    w = twiddles(num_bins, state.dtype, state.device).unsqueeze(-1)
    x = x_new.to(state.real.dtype).unsqueeze(-2)
    return w * (state * (t / (t + 1)) + x / (t + 1))


def symmetric_keep(keep: torch.Tensor) -> torch.Tensor:
    """Complete a bin mask (..., M) to conjugate symmetry: k kept => M - k kept."""
    keep = torch.as_tensor(keep, dtype=torch.bool)
    num_bins = keep.shape[-1]
    mirror = (-torch.arange(num_bins, device=keep.device)) % num_bins
    return keep | keep[..., mirror]


def iwdft_slots(state: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Real slots (..., num_bins, head_dim) by inverse DFT of the kept bins.

    keep: bool (num_bins,) or broadcastable (..., num_bins) (e.g. one mask per head); None keeps
    every bin. With every bin kept, slot m = (M/t) * the sum of the tokens whose distance from the
    newest token is congruent to m mod M (the average of those tokens when M divides t).
    """
    num_bins = state.shape[-2]
    if keep is not None:
        keep = symmetric_keep(keep.to(state.device))
        if keep.shape[-1] != num_bins:
            raise ValueError(f"keep mask has {keep.shape[-1]} bins but the state has {num_bins}")
        state = state * keep.unsqueeze(-1)
    return (torch.fft.ifft(state, dim=-2) * num_bins).real
