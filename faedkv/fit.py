"""Attention-matched slots: refit each slot's logit bias and value so that the prompt's own last
queries (the probes, as SnapKV's observation window) give it the attention mass and the
attention-weighted value its tokens had. Closed form per (batch, KV head, slot); the keys stay
the class means.

A class mean's logit is the mean of its members' logits, so with the log-count mass a slot takes
c exp(mean logit) where its members took sum(exp(logit)): never more (Jensen), and far less when
one member matches the query much better than the rest. The fitted bias matches the two over the
probes (it is never below log c when the keys are exact class means), and the fitted value is
the members' values weighted by the attention the probes gave them.
"""
from __future__ import annotations

import torch

from faedkv.rope import rotate


def probe_queries(module, hidden_states: torch.Tensor, position_embeddings, probes: int) -> torch.Tensor:
    """Post-RoPE queries (batch, heads, P, head_dim) of the last `probes` prefill tokens."""
    from kvpress.utils import get_prerope_query_states

    probes = min(probes, hidden_states.shape[1])
    query = get_prerope_query_states(module, hidden_states[:, -probes:])
    cos, sin = position_embeddings
    return rotate(query, cos[:, -probes:].unsqueeze(1), sin[:, -probes:].unsqueeze(1))


def class_members(num_tokens: int, num_slots: int, device) -> torch.Tensor:
    """(N,) the iwdft class of each middle token: its distance from the newest, mod M."""
    return (num_tokens - torch.arange(num_tokens, device=device)) % num_slots


def fit_slots(queries: torch.Tensor, scaling: float, keys: torch.Tensor, values: torch.Tensor,
              slot_keys: torch.Tensor, members: torch.Tensor, floor: float = 0.1
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(bias (batch, kv_heads, M), values (batch, kv_heads, M, head_dim)), float32.

    queries (batch, heads, P, d) post-RoPE; keys, values (batch, kv_heads, N, d): the tokens the
    slots stand for; slot_keys (batch, kv_heads, M, d) as cached; members (N,) the slot of each
    token. bias_m = log sum_q P_qm - log sum_q exp(q . k_m s - Z_q), with P_qm the probe's
    attention to class m and Z_q its normalisation over the N tokens; value_m = the members'
    values weighted by sum_q p_qi + floor x the mean such weight (a class no probe looks at
    keeps close to its plain mean)."""
    batch, heads, probes, dim = queries.shape
    kv_heads, num_slots = keys.shape[1], slot_keys.shape[2]
    grouped = queries.float().reshape(batch, kv_heads, heads // kv_heads * probes, dim)
    logits = grouped @ keys.float().transpose(-1, -2) * scaling             # (B, Hkv, Q, N)
    norm = torch.logsumexp(logits, dim=-1, keepdim=True)
    weights = torch.exp(logits - norm)                                       # p_qi
    class_mass = torch.zeros(batch, kv_heads, grouped.shape[2], num_slots, device=keys.device)
    class_mass.index_add_(-1, members, weights)                              # P_qm
    slot_weight = torch.exp(grouped @ slot_keys.float().transpose(-1, -2) * scaling - norm)
    tiny = torch.finfo(torch.float32).tiny
    bias = torch.log(class_mass.sum(2).clamp(min=tiny)) - torch.log(slot_weight.sum(2).clamp(min=tiny))
    token_weight = weights.sum(2)                                            # (B, Hkv, N)
    token_weight = token_weight + floor * token_weight.mean(-1, keepdim=True)
    sums = torch.zeros(batch, kv_heads, num_slots, dim, device=keys.device)
    sums.index_add_(2, members, values.float() * token_weight.unsqueeze(-1))
    totals = torch.zeros(batch, kv_heads, num_slots, device=keys.device).index_add_(-1, members, token_weight)
    return bias, sums / totals.clamp(min=tiny).unsqueeze(-1)
