"""Capture every layer's keys and values during one prefill, one layer at a time.

    def consume(kv: LayerKV):          # called once per layer, in layer order
        spectra[kv.layer] = spectrum(kv.keys)    # reduce it now; kv is dropped afterwards
    stream_kv(model, input_ids, consume)

Post-RoPE keys and values are taken exactly as the model hands them to its cache: a cache
object whose `update` gives them to `consume` and stores nothing (the attention of the prefill
still sees them: it receives what `update` returns). Pre-RoPE keys are the output of `k_proj`
(of `k_norm` when the attention has one, as Qwen3 does) before the rotary embedding, captured
by a forward hook and held only until the same layer's cache update arrives. So at any moment
at most one layer's K/V is alive, whatever the model's depth: capturing a 32K-token context of
an 8B model costs one layer's K/V on top of the forward pass, not the whole cache.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from transformers import DynamicCache


@dataclasses.dataclass
class LayerKV:
    """One layer's prefill K/V. Shapes `(batch, kv_heads, tokens, head_dim)`, model dtype."""
    layer: int
    keys: torch.Tensor                  # post-RoPE, as cached
    values: torch.Tensor                # values carry no rotation: one space only
    pre_rope_keys: torch.Tensor | None  # k_proj (k_norm) output before the rotary embedding


class _PassThroughCache(DynamicCache):
    """A cache that stores nothing: each layer's update goes to a callback and is returned to
    the attention unchanged, so a single prefill forward computes exactly what it would with a
    real cache while no layer's K/V outlives its own attention call."""

    def __init__(self, on_update: Callable[[int, torch.Tensor, torch.Tensor], None]):
        super().__init__()
        self._on_update = on_update

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        self._on_update(layer_idx, key_states, value_states)
        return key_states, value_states


def decoder_layers(model) -> list:
    """The decoder layers of a causal LM (text part of multimodal models too)."""
    inner = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return list(inner.layers)


def _pre_rope_module(attn):
    """The module whose output is the key before rotation: k_norm when present, else k_proj."""
    return attn.k_norm if getattr(attn, "k_norm", None) is not None else attn.k_proj


@torch.no_grad()
def stream_kv(model, input_ids: torch.Tensor, consume: Callable[[LayerKV], None],
              pre_rope: bool = True) -> None:
    """Run one prefill of `input_ids` `(batch, tokens)` and call `consume(LayerKV)` for every
    layer in order, as soon as that layer's keys and values exist. Nothing is kept: `consume`
    must reduce what it needs (the tensors are freed when the layer's attention returns)."""
    layers = decoder_layers(model)
    head_dim = getattr(model.config, "head_dim", None) or (
        model.config.hidden_size // model.config.num_attention_heads)
    pending: dict[int, torch.Tensor] = {}
    hooks = []

    def stash(layer_idx):
        def hook(module, args, output):
            batch, tokens = output.shape[0], output.shape[1]
            # (batch, tokens, kv_heads * head_dim) or (batch, tokens, kv_heads, head_dim)
            pending[layer_idx] = output.reshape(batch, tokens, -1, head_dim).transpose(1, 2)
        return hook

    def on_update(layer_idx, keys, values):
        pre = pending.pop(layer_idx, None)
        if pre_rope and pre is None:
            raise ValueError(f"layer {layer_idx}: no pre-RoPE keys were captured (the attention "
                             "has neither k_proj nor k_norm); pass pre_rope=False for this model.")
        consume(LayerKV(layer_idx, keys, values, pre))

    if pre_rope:
        for i, layer in enumerate(layers):
            hooks.append(_pre_rope_module(layer.self_attn).register_forward_hook(stash(i)))
    try:
        model(input_ids=input_ids, past_key_values=_PassThroughCache(on_update), use_cache=True,
              logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
        pending.clear()
