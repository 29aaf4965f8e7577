"""Token contribution: how much each original token n reaches what attention sees.

Attention sees slot m with its mass w_m (+ log w_m on its logit): the same as w_m identical rows.
So the map that matters is the attention-equivalent one, from the N middle tokens to the
expanded cache in which slot m is repeated w_m times; token n's contribution is the weight of
its column there, sum_m w_m |A[m, n]| (the column sum for non-negative maps such as iwdft's class
means; absolute values for signed maps such as a DCT or a band-limiting plan). The profile is
normalised to max 1 and summarised by 1 - Gini, the oldest tenth over the newest tenth, and min
over max. FAEDKV's iwdft with its mass gives 1, 1, 1 (each token enters its class mean with
weight 1/c_m and the class counts c_m times); without the mass the classes with more tokens
weigh each of them less.
"""
from __future__ import annotations

import torch


def contribution_profile(matrix, mass=None) -> torch.Tensor:
    """Column weights sum_m mass_m |matrix[m, n]| of a (slots x tokens) map, normalised to max 1,
    (tokens,) float64, tokens oldest first. mass (slots,): the tokens attention counts each slot
    for (faedkv.variants.slot_mass with the mass correction); None counts every row once. An
    all-zero map gives zeros."""
    matrix = torch.as_tensor(matrix, dtype=torch.float64)
    if matrix.ndim != 2 or matrix.shape[1] < 1:
        raise ValueError(f"contribution_profile needs a (slots, tokens) matrix, got shape {tuple(matrix.shape)}")
    weights = torch.ones(matrix.shape[0], dtype=torch.float64) if mass is None else \
        torch.as_tensor(mass, dtype=torch.float64).flatten()
    if weights.shape[0] != matrix.shape[0]:
        raise ValueError(f"mass has {weights.shape[0]} entries for a map of {matrix.shape[0]} slots")
    columns = weights @ matrix.abs()
    peak = columns.max()
    return columns / peak if peak > 0 else columns


def gini(values: torch.Tensor) -> float:
    """Gini coefficient of non-negative values (0 = all equal)."""
    v = torch.sort(torch.as_tensor(values, dtype=torch.float64).flatten()).values
    n, total = v.numel(), v.sum()
    if n == 0 or total <= 0:
        return 0.0
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    return float((2 * (ranks * v).sum()) / (n * total) - (n + 1) / n)


def equality_summary(profile) -> dict:
    """{"one_minus_gini", "oldest_over_newest" (mean of the oldest tenth / the newest tenth),
    "min_over_max"} of a contribution profile (tokens oldest first)."""
    p = torch.as_tensor(profile, dtype=torch.float64).flatten()
    if p.numel() == 0:
        raise ValueError("equality_summary needs a non-empty profile")
    if (p < 0).any():
        raise ValueError("a contribution profile is non-negative (column norms)")
    tenth = max(1, p.numel() // 10)
    newest = p[-tenth:].mean()
    peak = p.max()
    return {"one_minus_gini": 1.0 - gini(p),
            "oldest_over_newest": float(p[:tenth].mean() / newest) if newest > 0 else float("inf"),
            "min_over_max": float(p.min() / peak) if peak > 0 else 0.0}
