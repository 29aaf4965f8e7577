"""Undo and redo rotary position embeddings (Llama's rotate-half convention) for pre-RoPE keys.

A post-RoPE key is k_rot(p) = s * R(p) k with R(p) the rotation by p * inv_freq and s the rope
type's attention scaling (1 for default RoPE). Undoing it at the token's own position gives
s^2 * k, so we divide s^2 out and the compressor sees k; rotating a slot back multiplies s in.
Positions may be fractional (a slot's representative position is a mean of token positions).
"""
from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_parameters(module) -> tuple[torch.Tensor, float]:
    """(inv_freq (head_dim/2,), attention_scaling) of an attention layer's rotary embedding.

    kvpress's press context sets `module.rotary_emb`; a model's `model.rotary_emb` works too."""
    rotary = getattr(module, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise ValueError("pre-RoPE key space needs the layer's rotary embedding (module.rotary_emb "
                         "with inv_freq); apply the press with `with press(model):` so kvpress "
                         "attaches it, or use key_space='post_rope'")
    return rotary.inv_freq, float(getattr(rotary, "attention_scaling", 1.0))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (..., P, head_dim) at (possibly fractional) positions (..., P), in float64 then cast."""
    angles = positions.double().unsqueeze(-1) * inv_freq.double().to(positions.device)
    emb = torch.cat((angles, angles), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE: x (..., P, head_dim) with cos/sin broadcastable to it."""
    return x * cos + rotate_half(x) * sin


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Inverse of `rotate` for cos/sin carrying the factor `scaling`: R(-p) x / scaling^2."""
    return (x * cos - rotate_half(x) * sin) / (scaling * scaling)


def token_positions(kwargs: dict, num_tokens: int, device) -> torch.Tensor:
    """Absolute positions (num_tokens,) of the prefill tokens from the hook's kwargs
    (position_ids when the model passes them, else cache_position, else 0..T-1)."""
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and position_ids.shape[-1] == num_tokens:
        return position_ids.reshape(-1, num_tokens)[0].to(device)
    cache_position = kwargs.get("cache_position")
    if cache_position is not None and cache_position.shape[-1] == num_tokens:
        return cache_position.to(device)
    return torch.arange(num_tokens, device=device)
