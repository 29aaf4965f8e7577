"""Token contribution: how much each original token n reaches the compressed cache.

For a linear map A (slots x tokens) the contribution of token n is the norm of column n. The
profile is normalised to max 1 and summarised by 1 - Gini, the oldest tenth over the newest tenth,
and min over max. An equal-contribution map (FAEDKV's IWDFT) gives 1, 1, 1.
"""
from __future__ import annotations

import torch


def contribution_profile(matrix) -> torch.Tensor:
    """Column norms of matrix (slots x tokens), normalised to max 1, (tokens,) float64.
    Tokens are ordered oldest first. An all-zero map gives zeros."""
    matrix = torch.as_tensor(matrix, dtype=torch.float64)
    if matrix.ndim != 2 or matrix.shape[1] < 1:
        raise ValueError(f"contribution_profile needs a (slots, tokens) matrix, got shape {tuple(matrix.shape)}")
    norms = torch.linalg.vector_norm(matrix, dim=0)
    peak = norms.max()
    return norms / peak if peak > 0 else norms


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
