"""An sdpa attention function for compressed caches, registered through transformers'
AttentionInterface (no model code is patched):

- **mass correction**: a slot is the mean of the c tokens it stands for, so its logit gets
  + log c (c identical rows are one row with + log c); the press stores the per-column bias on
  the attention module, like kvpress stores `masked_key_indices` (a fresh prefill clears it),
  and FAEDKVCache hands it over with the keys it returns (`faedkv.decode.slots.Handoff`);
- **per-layer cache lengths**: transformers builds one causal mask from layer 0's cache length;
  when a layer's cache is longer or shorter (PerLayerCompressionPress), the mask is re-aligned to
  that layer's keys, bottom-right (the new queries see every cached column and each other
  causally). Left padding cannot be re-aligned this way and raises.
- **ring means in place**: FAEDKVCache stores the middle as ring means, whose counts change
  every token. When this attention runs, a decode step hands it the stored buffer with the
  layer's `SlotState` and each ring row's log count goes into its logit
  (`faedkv.decode.slots.slot_attention`), so no slot is ever written. The cache offers that only
  after this function has served the layer (`SlotState.served_by`) and only while the model
  still runs this attention.
- **split store**: DimsplitCache (faedkv.decode.dimsplit) hands over its exact rows with the
  layer itself, whose `attend` reads the dimension split's middle without rebuilding its rows.
  Any in-place handoff is answered by its `slots.attend(module, query, key, value, mask, ...)`.

`use_faedkv_attention(config)` switches an sdpa model to it (its mask function is sdpa's, and
with no bias and equal lengths it calls sdpa unchanged, so outputs are identical). Keys that
FAEDKVCache handed over reach it even on a plain sdpa model: importing this module wraps the
registered "sdpa" once (as kvpress wraps it for its head-wise masks) so that such keys switch
the model's config to this attention and are served by it; other keys go to sdpa unchanged.
"""
from __future__ import annotations

import kvpress  # noqa: F401 - patches the registered functions at import; do it before we register
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from faedkv.decode.slots import posted

FAEDKV_SDPA = "faedkv_sdpa"
FAEDKV_STATIC_SDPA = "faedkv_static_sdpa"   # StaticFAEDKVCache's (faedkv.decode.static registers it)
BIAS_ATTR = "faedkv_column_bias"


def realign_mask(mask: torch.Tensor, key_len: int) -> torch.Tensor:
    """Bottom-right re-alignment of a (..., q, K0) mask to key_len columns."""
    built_len = mask.shape[-1]
    visible = mask if mask.dtype == torch.bool else mask == 0
    if key_len < built_len:
        dropped = visible[..., : built_len - key_len]
        if not bool(dropped.all()):
            raise ValueError("per-layer cache lengths with a padded batch are not supported: "
                             "run unpadded prompts (batch size 1 or equal lengths)")
        return mask[..., built_len - key_len:]
    if not bool(visible[..., :1].all()):
        raise ValueError("per-layer cache lengths with a padded batch are not supported: "
                         "run unpadded prompts (batch size 1 or equal lengths)")
    extra = mask[..., :1].expand(*mask.shape[:-1], key_len - built_len)
    return torch.cat([extra, mask], dim=-1)


def column_bias(module, key, key_len: int, dtype, device) -> torch.Tensor | None:
    """Additive bias of the slot columns, from the (start, bias) FAEDKVCache handed over with
    `key` or the one FAEDKVPress recorded on the module, or None: (key_len,) for one bias per
    column, or (batch, kv_heads, key_len) for a per-head bias (fitted slots)."""
    handoff = posted(module, key)
    recorded = handoff.mass if handoff is not None else None
    recorded = recorded or getattr(module, BIAS_ATTR, None)
    if recorded is None:
        return None
    start, bias = recorded
    if start + bias.shape[-1] > key_len:  # the cache was cut below the slots: nothing to correct
        return None
    full = torch.zeros(bias.shape[:-1] + (key_len,), dtype=dtype, device=device)
    full[..., start:start + bias.shape[-1]] = bias.to(device=device, dtype=dtype)
    return full


def broadcast_bias(bias: torch.Tensor, heads: int) -> torch.Tensor:
    """A column bias shaped for a (batch, heads, q, key_len) mask: (key_len,) as it is,
    (batch, kv_heads, key_len) repeated over each KV head's query heads."""
    if bias.ndim == 1:
        return bias
    return bias.repeat_interleave(heads // bias.shape[1], dim=1).unsqueeze(2)


def causal_bool_mask(q_len: int, key_len: int, device) -> torch.Tensor:
    """(1, 1, q, key_len) bottom-right causal mask (query i sees columns <= key_len - q + i)."""
    rows = torch.arange(q_len, device=device).unsqueeze(-1) + (key_len - q_len)
    return (torch.arange(key_len, device=device) <= rows)[None, None]


def faedkv_sdpa_attention(module, query, key, value, attention_mask, *args, **kwargs):
    handoff = posted(module, key)
    if handoff is not None:
        slots = handoff.slots()
        # FAEDKVCache may hand this layer its ring means from its next call on, while this
        # config still runs this attention
        slots.served_by(module.config)
        if handoff.in_place:   # the cache layer's own reader (SlotState, DimsplitLayer)
            return slots.attend(module, query, key, value, attention_mask, **kwargs)
    q_len, key_len = query.shape[-2], key.shape[-2]
    if q_len == key_len:
        # A fresh prefill: the previous compression's slots are gone.
        setattr(module, BIAS_ATTR, None)
    if attention_mask is not None and attention_mask.shape[-1] != key_len:
        attention_mask = realign_mask(attention_mask, key_len)
    bias = column_bias(module, key, key_len, query.dtype, query.device)
    if bias is not None:
        if attention_mask is None:
            attention_mask = causal_bool_mask(q_len, key_len, query.device)
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device
                                         ).masked_fill(~attention_mask, torch.finfo(query.dtype).min)
        attention_mask = attention_mask + broadcast_bias(bias, query.shape[1])
    # sdpa as registered before us: kvpress's own wrapper (head-wise masking) stays in the chain
    return _SDPA(module, query, key, value, attention_mask, *args, **kwargs)


def sdpa_serving_faedkv_keys(module, query, key, value, attention_mask, *args, **kwargs):
    """The registered "sdpa", except that keys FAEDKVCache handed over switch the model's config
    to faedkv_sdpa and are served by it (so the cache's log-count mass needs nothing from the user)."""
    if posted(module, key) is not None:
        use_faedkv_attention(module.config)
        return faedkv_sdpa_attention(module, query, key, value, attention_mask, *args, **kwargs)
    return _SDPA(module, query, key, value, attention_mask, *args, **kwargs)


_SDPA = ALL_ATTENTION_FUNCTIONS["sdpa"]
if getattr(_SDPA, "__name__", "") == sdpa_serving_faedkv_keys.__name__:   # a re-import
    _SDPA = _SDPA.inner
sdpa_serving_faedkv_keys.inner = _SDPA
ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_serving_faedkv_keys   # where kvpress puts its wrapper too
AttentionInterface.register(FAEDKV_SDPA, faedkv_sdpa_attention)
AttentionMaskInterface.register(FAEDKV_SDPA, sdpa_mask)


def use_faedkv_attention(config) -> None:
    """Switch a model config (shared by its attention layers) from sdpa to faedkv_sdpa."""
    current = getattr(config, "_attn_implementation", None)
    if current == FAEDKV_SDPA:
        return
    if current not in ("sdpa", None):
        raise ValueError(f"FAEDKV's attention hook (mass correction, per-layer cache lengths) wraps "
                         f"sdpa, but the model uses {current!r}; load it with "
                         "attn_implementation='sdpa'")
    config._attn_implementation = FAEDKV_SDPA


def restore_sdpa(config) -> None:
    """Undo `use_faedkv_attention`, or a StaticFAEDKVCache's switch to faedkv_static_sdpa."""
    if getattr(config, "_attn_implementation", None) in (FAEDKV_SDPA, FAEDKV_STATIC_SDPA):
        config._attn_implementation = "sdpa"


def log_mass(tokens_per_slot: torch.Tensor) -> torch.Tensor:
    """log(tokens per slot), float32 (a slot standing for no token gets a very low logit)."""
    return torch.log(tokens_per_slot.double().clamp(min=1e-12)).float()


def record_slot_bias(module, start: int, tokens_per_slot: torch.Tensor) -> None:
    """Store + log(tokens per slot) for the columns [start, start + M) of this layer."""
    setattr(module, BIAS_ATTR, (start, log_mass(tokens_per_slot)))


def record_fitted_bias(module, start: int, bias: torch.Tensor) -> None:
    """Store a fitted logit bias (batch, kv_heads, M) for the columns [start, start + M)."""
    setattr(module, BIAS_ATTR, (start, bias.float()))

