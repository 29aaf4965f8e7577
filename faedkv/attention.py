"""An sdpa attention function for compressed caches, registered through transformers'
AttentionInterface (no model code is patched):

- **mass correction**: a slot is the mean of the c tokens it stands for, so its logit gets
  + log c (c identical rows are one row with + log c); the press stores the per-column bias on
  the attention module, like kvpress stores `masked_key_indices` (a fresh prefill clears it),
  and FAEDKVCache marks the keys it hands over (`MASS_ATTR`);
- **per-layer cache lengths**: transformers builds one causal mask from layer 0's cache length;
  when a layer's cache is longer or shorter (PerLayerCompressionPress), the mask is re-aligned to
  that layer's keys, bottom-right (the new queries see every cached column and each other
  causally). Left padding cannot be re-aligned this way and raises.

- **ring means in place**: FAEDKVCache stores the middle as ring means, whose counts change
  every token. When this attention runs, a decode step hands it the stored buffer with its
  `SlotScales` and each ring row's log count goes into its logit (`slot_attention`), so no slot
  is ever written (see faedkv.fused_decode). The cache offers that only after this function has
  answered its probe and only while the model still runs this attention.

`use_faedkv_attention(config)` switches an sdpa model to it (its mask function is sdpa's, and
with no bias and equal lengths it calls sdpa unchanged, so outputs are identical). Keys that
FAEDKVCache marked reach it even on a plain sdpa model: importing this module wraps the
registered "sdpa" once (as kvpress wraps it for its head-wise masks) so that such keys switch
the model's config to this attention and are served by it; unmarked keys go to sdpa unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import kvpress  # noqa: F401 - patches the registered functions at import; do it before we register
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from faedkv.iwdft import band_limit

FAEDKV_SDPA = "faedkv_sdpa"
BIAS_ATTR = "faedkv_column_bias"
SLOT_SCALES_ATTR = "faedkv_slot_scales"   # on a key tensor: its ring-mean rows need their mass
PROBE_ATTR = "faedkv_probe"               # on a key tensor: the cache layer asking who attends
MASS_ATTR = "faedkv_mass"                 # on a key tensor: (start, log counts) of its slot rows


@dataclass
class SlotScales:
    """Key rows [start, start + count) hold ring means; row start + r stands for its class of
    tokens, and its logit gets + (more if r < filled else less) = log(count_r) (the mass). With a
    plan, `masks` (2, 1, kv_heads or 1, count//2 + 1, 1) (keys, values: FAEDKVCache's rfft-half
    masks) band-limit those means along the rows. A cache layer keeps one and updates it every
    step; `kernel` keeps the attention's compiled launch for that layer's rows, `workspace` the
    scratch its cache's layers share."""
    start: int
    count: int
    filled: int
    more: float
    less: float
    kernel: object = None
    workspace: dict | None = None
    masks: torch.Tensor | None = None

    def column_bias(self, rows: int, device) -> torch.Tensor:
        """(rows,) float32: the logit bias of every key row (0 outside the ring means)."""
        bias = torch.zeros(rows, dtype=torch.float32, device=device)
        bias[self.start:self.start + self.filled] = self.more
        bias[self.start + self.filled:self.start + self.count] = self.less
        return bias


def slot_attention_torch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             scales: SlotScales, scaling: float,
                             matmul_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """softmax(scaling * q . k'_j + b_j) . v'_j over every key row j, softmax in float32.

    Outside the ring rows k' = k, v' = v and b = 0; on them k' = C k and v' = C v, with C the
    plan's band-limiting circulant (identity without masks), and b = log(count) (the mass). C is
    real and symmetric and attention is linear in k' and v', so C is applied to the ring rows'
    logits and, after the softmax, to their probabilities: O(M log M) per query head instead of
    an FFT over (M, head_dim) rows and a slot tensor written every step.

    query (batch, heads, 1, head_dim); key, value (batch, kv_heads, rows, head_dim) ->
    (batch, 1, heads, head_dim). matmul_dtype: the q.k and p.v products (float32: the
    definition `fused_decode.SlotAttention` matches; the model's dtype: eager attention's
    rounding, no float32 copy of the rows)."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    ring = slice(scales.start, scales.start + scales.count)
    bias = scales.column_bias(key.shape[-2], query.device)
    grouped = query.to(matmul_dtype).reshape(batch, kv_heads, heads // kv_heads * length, dim)
    logits = (grouped @ key.to(matmul_dtype).transpose(-1, -2)).float()
    if scales.masks is not None:
        key_mask, value_mask = scales.masks.transpose(-1, -2)   # (1, kv_heads or 1, 1, M//2 + 1)
        logits[..., ring] = band_limit(logits[..., ring], key_mask)
    weights = torch.softmax(logits * scaling + bias, dim=-1)
    if scales.masks is not None:
        weights[..., ring] = band_limit(weights[..., ring], value_mask)
    out = weights.to(matmul_dtype) @ value.to(matmul_dtype)
    return out.reshape(batch, heads, length, dim).transpose(1, 2).to(query.dtype)


def slot_attention(module, query, key, value, attention_mask, scales: SlotScales,
                   scaling: float | None = None, **_) -> tuple[torch.Tensor, None]:
    """One decode token over FAEDKVCache's stored [sink | ring means | window]: Triton's split-KV
    kernel where it runs, else `slot_attention_torch` in float32. With plan masks the torch one
    runs, its products in the model's dtype on CUDA (a fused kernel cannot filter logits across splits
    before the softmax). attention_mask is not read: the cache serves unpadded batches and one
    query token, which sees every row."""
    from faedkv import fused
    from faedkv.fused_decode import SlotAttention

    scaling = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
    if query.shape[-2] != 1:
        raise ValueError("slot-scaled attention serves one new token per call; FAEDKVCache "
                         "materialises the slots for longer calls")
    if scales.masks is not None:
        matmul_dtype = key.dtype if key.is_cuda else torch.float32
        return slot_attention_torch(query, key, value, scales, scaling, matmul_dtype), None
    kernel = scales.kernel
    if kernel is None or kernel.keys is not key or kernel.values is not value:
        if not (fused.can_fuse_decode(query) and fused.can_fuse_decode(key) and fused.can_fuse_decode(value)):
            return slot_attention_torch(query, key, value, scales, scaling), None
        kernel = scales.kernel = SlotAttention(key, value, scales.start, scales.count,
                                               workspace=scales.workspace)
    out = query.new_empty(query.shape[0], 1, query.shape[1], query.shape[-1])
    kernel(out, query, scales.filled, scales.more, scales.less, scaling)
    return out, None


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
    """Additive bias of the slot columns, from the keys' mark (FAEDKVCache) or the module's
    recorded (start, bias) (FAEDKVPress), or None: (key_len,) for one bias per column, or
    (batch, kv_heads, key_len) for a per-head bias (fitted slots)."""
    recorded = getattr(key, MASS_ATTR, None) or getattr(module, BIAS_ATTR, None)
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
    scales = getattr(key, SLOT_SCALES_ATTR, None)
    if scales is not None:
        return slot_attention(module, query, key, value, attention_mask, scales, **kwargs)
    probe = getattr(key, PROBE_ATTR, None)
    if probe is not None:
        # FAEDKVCache may hand this layer ring means from its next call on, while this
        # config still runs this attention
        probe.attention_config = module.config
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


def marked(key: torch.Tensor) -> bool:
    """Keys FAEDKVCache handed over: they need faedkv's attention."""
    return any(getattr(key, name, None) is not None for name in (SLOT_SCALES_ATTR, PROBE_ATTR, MASS_ATTR))


def sdpa_serving_faedkv_keys(module, query, key, value, attention_mask, *args, **kwargs):
    """The registered "sdpa", except that keys FAEDKVCache marked switch the model's config to
    faedkv_sdpa and are served by it (so the cache's log-count mass needs nothing from the user)."""
    if marked(key):
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
    """Undo `use_faedkv_attention`."""
    if getattr(config, "_attn_implementation", None) == FAEDKV_SDPA:
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


def mark_mass(keys: torch.Tensor, start: int, tokens_per_slot: torch.Tensor) -> torch.Tensor:
    """Mark keys whose rows [start, start + M) are slots standing for tokens_per_slot tokens."""
    setattr(keys, MASS_ATTR, (start, log_mass(tokens_per_slot)))
    return keys
