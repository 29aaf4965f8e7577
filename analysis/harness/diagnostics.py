"""Why a compressed cache answers differently, per layer and KV head.

For the queries of the tokens that come after the compressed context (the question and the
answer prefix, when the press is query-agnostic) this compares attention over the compressed
cache with attention over the full one, both computed here in float32 from the caches' rows:

- ``output_error``: ||o_compressed - o_full|| / ||o_full|| of the attention outputs over the
  cached context (the probes' own rows left out on both sides), mean over the group's query heads;
- ``middle_mass_full``: the attention mass that the middle tokens [sink, T - window) take under
  full attention; ``middle_mass_compressed``: the mass the compressed middle rows take (slots
  with their log-count bias, plus a hybrid's exact tokens); ``slot_mass``: the slots' share alone.
  A slot is the mean of its class and takes exp(mean of its members' logits + log c) where the
  members took sum(exp(logit)): by Jensen never more, and much less when one member matches the
  query far better than the rest, which is what a needle does. FAEDKV presses only (None else).

Each layer is measured on the same queries (from the full-cache run), so the numbers isolate what
that layer's compression does, not what earlier layers passed on.
"""
from __future__ import annotations

import math

import torch


def probe_queries(model, context_ids: torch.Tensor, probe_ids: torch.Tensor):
    """Post-RoPE queries (1, heads, P, head_dim) of the probe tokens at every layer, and the
    full cache of the context, from one full-cache prefill of context + probes."""
    from kvpress.utils import get_prerope_query_states
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    queries: dict[int, torch.Tensor] = {}

    def capture(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        query = get_prerope_query_states(module, hidden)
        queries[module.layer_idx], _ = apply_rotary_pos_emb(query, query, cos, sin)

    layers = model.model.layers
    cache = DynamicCache()
    model.model(input_ids=context_ids, past_key_values=cache)
    handles = [layer.self_attn.register_forward_pre_hook(capture, with_kwargs=True) for layer in layers]
    try:
        start = context_ids.shape[1]
        positions = torch.arange(start, start + probe_ids.shape[1], device=context_ids.device)[None]
        model.model(input_ids=probe_ids, past_key_values=cache, position_ids=positions)
    finally:
        for handle in handles:
            handle.remove()
    return queries, cache, start


def attention_weights(query: torch.Tensor, keys: torch.Tensor, scaling: float,
                      bias: torch.Tensor | None = None, masked: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scaling + bias) in float32, grouped by KV head: query (1, H, P, d), keys
    (1, Hkv, R, d) -> (Hkv, G*P, R). masked (Hkv, R) bool: rows a press masks (kvzip)."""
    heads, kv_heads = query.shape[1], keys.shape[1]
    grouped = query[0].float().reshape(kv_heads, heads // kv_heads * query.shape[2], -1)
    logits = grouped @ keys[0].float().transpose(-1, -2) * scaling
    if bias is not None:       # (R,) or (1, Hkv, R)
        logits = logits + (bias[0][:, None, :] if bias.ndim == 3 else bias).float()
    if masked is not None:
        logits = logits.masked_fill(masked[:, None, :], -math.inf)
    return torch.softmax(logits, dim=-1)


def masked_rows(module, kv_heads: int, rows: int, device) -> torch.Tensor | None:
    """kvpress's head-wise masks (`masked_key_indices`, batch 1) as (Hkv, R) bool, or None."""
    indices = getattr(module, "masked_key_indices", None)
    if indices is None:
        return None
    mask = torch.zeros(kv_heads, rows, dtype=torch.bool, device=device)
    batch, head, seq = indices
    keep = (batch == 0) & (seq < rows)
    mask[head[keep], seq[keep]] = True
    return mask


@torch.no_grad()
def attention_diagnostics(loaded, press, context_ids: torch.Tensor, probe_ids: torch.Tensor) -> dict:
    """Per layer and KV head: output_error, middle_mass_full, middle_mass_compressed, slot_mass
    (see the module docstring). context_ids (1, T), probe_ids (1, P) on the model's device."""
    from transformers import DynamicCache

    from analysis.harness.methods import attention_for

    model = loaded.model
    probes = probe_queries(model, context_ids, probe_ids)
    compressed = DynamicCache()
    with attention_for(press, model):
        if press is None:
            model.model(input_ids=context_ids, past_key_values=compressed)
        else:
            with press(model):
                model.model(input_ids=context_ids, past_key_values=compressed)
    return compare_attention(model, press, probes, compressed)


@torch.no_grad()
def compare_attention(model, press, probes, compressed) -> dict:
    """attention_diagnostics from probe_queries' (queries, full cache, context length), taken before
    the press's prefill, and the press's cache of the same context, read before any other prefill
    (the press's masks and slot biases live on the model's modules until the next one)."""
    from faedkv.attention import column_bias

    queries, full, context = probes
    stats = getattr(press, "last_stats", None) or {}
    probe_count = next(iter(queries.values())).shape[2]
    out = {"probes": int(probe_count), "context_tokens": int(context), "output_error": [],
           "middle_mass_full": [], "middle_mass_compressed": [], "slot_mass": []}
    for index, layer in enumerate(model.model.layers):
        module = layer.self_attn
        query = queries[index]
        keys, values = full.layers[index].keys[..., :context, :], full.layers[index].values[..., :context, :]
        small_keys, small_values = compressed.layers[index].keys, compressed.layers[index].values
        rows = small_keys.shape[-2]
        bias = column_bias(module, small_keys, rows, torch.float32, small_keys.device)
        weights_full = attention_weights(query, keys, module.scaling)
        weights = attention_weights(query, small_keys, module.scaling, bias,
                                    masked_rows(module, small_keys.shape[1], rows, small_keys.device))
        full_out = weights_full @ values[0].float()
        small_out = weights @ small_values[0].float()
        error = (small_out - full_out).norm(dim=(-2, -1)) / full_out.norm(dim=(-2, -1)).clamp(min=1e-30)
        out["output_error"].append(error.tolist())
        layout = stats.get(index)
        if layout and (layout.get("slots") or layout.get("exact_dims") is not None):
            sink, window, exact, slots = (layout["sink_tokens"], layout["window"], layout["exact"], layout["slots"])
            out["middle_mass_full"].append(weights_full[..., sink:context - window].sum(-1).mean(-1).tolist())
            out["middle_mass_compressed"].append(weights[..., sink:rows - window].sum(-1).mean(-1).tolist())
            # dimsplit (exact_dims recorded) has no slots: every middle row is a token
            out["slot_mass"].append(weights[..., sink + exact:sink + exact + slots].sum(-1).mean(-1).tolist()
                                    if slots else None)
        else:
            for name in ("middle_mass_full", "middle_mass_compressed", "slot_mass"):
                out[name].append(None)
    return out
