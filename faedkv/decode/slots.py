"""What a FAEDKVCache layer hands the attention that reads its keys, and the slot attention.

FAEDKVCache stores the middle as ring means whose counts change every token. Each update of a
layer posts a `Handoff` for the attention call that follows it (same layer index, same
thread): which tensor it returned and how to read it.

- the prefill's exact keys: nothing to correct;
- materialised keys [sink | slots | window | new]: the slot rows' log counts (`mass`), which
  faedkv_sdpa adds to their logits;
- the stored buffer [sink | ring means | window ring] itself (`in_place`): `slot_attention`
  adds each ring row's log count (`SlotState`) and, with a plan, band-limits the ring rows, so
  no slot is written.

faedkv_sdpa (faedkv.attention) finds the handoff with `posted(module, key)` and answers with
`SlotState.served_by(config)`: the layer hands over its stored buffer only after that answer,
and only while that config still runs faedkv_sdpa. The registry holds weak references: a
handoff keeps neither the returned keys nor the cache alive.
"""
from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass

import torch

from faedkv.iwdft import band_limit, ring_log_counts


@dataclass(eq=False)
class SlotState:
    """One cache layer's ring means as attention reads them.

    Key rows [start, start + count) hold ring means; row start + r stands for its class of
    tokens, and its logit gets + (more if r < filled else less) = log(count_r) (the mass). With
    a plan, `masks` (2, 1, kv_heads or 1, count//2 + 1, 1) (keys, values: the cache's rfft-half
    masks) band-limit those means along the rows. `kernel` keeps the attention's compiled launch
    for the layer's rows, `workspace` the scratch its cache's layers share; `config` is the model
    config of the faedkv attention that last served the layer (None before)."""
    start: int
    count: int
    filled: int = 0
    more: float = 0.0
    less: float = 0.0
    masks: torch.Tensor | None = None
    workspace: dict | None = None
    kernel: object = None
    config: object = None

    def advance(self, folded: int) -> None:
        """The log counts once `folded` middle tokens are in the ring."""
        self.filled, self.more, self.less = ring_log_counts(folded, self.count)

    def served_by(self, config) -> None:
        """faedkv's attention read this layer's keys under `config` (the explicit answer to a handoff)."""
        self.config = config

    def attend(self, module, query, key, value, attention_mask=None, **kwargs):
        """faedkv_sdpa's call for an in-place handoff: `slot_attention` (no mask is read)."""
        return slot_attention(query, key, value, self, **kwargs)

    def column_bias(self, rows: int, device) -> torch.Tensor:
        """(rows,) float32: the logit bias of every key row (0 outside the ring means)."""
        bias = torch.zeros(rows, dtype=torch.float32, device=device)
        bias[self.start:self.start + self.filled] = self.more
        bias[self.start + self.filled:self.start + self.count] = self.less
        return bias


@dataclass(eq=False)
class Handoff:
    """What one update of a FAEDKVCache layer returned: `keys` and the layer's `slots`, both held
    weakly (materialised keys are transient). in_place: keys are the stored buffer, read by
    `slots.attend` (SlotState: slot attention; a DimsplitCache layer: its split store); mass:
    (first slot row, (M,) float32 log counts) of materialised slot rows; neither: exact keys
    (the prefill)."""
    keys: weakref.ref
    slots: weakref.ref
    in_place: bool = False
    mass: tuple[int, torch.Tensor] | None = None

    @classmethod
    def of(cls, keys: torch.Tensor, slots: SlotState, in_place: bool = False,
           mass: tuple[int, torch.Tensor] | None = None) -> Handoff:
        return cls(weakref.ref(keys), weakref.ref(slots), in_place, mass)


class _Posted(threading.local):
    def __init__(self):
        self.by_layer: dict[int, Handoff] = {}   # layer index -> the last handoff posted for it


_POSTED = _Posted()


def post(layer_idx: int, handoff: Handoff) -> None:
    """Hand `handoff` to the attention that runs next for layer `layer_idx` on this thread."""
    _POSTED.by_layer[layer_idx] = handoff


def posted(module, key: torch.Tensor) -> Handoff | None:
    """The handoff of the cache layer whose update returned `key` to this attention module
    (matched by layer index and tensor identity), or None: keys of any other cache."""
    handoff = _POSTED.by_layer.get(getattr(module, "layer_idx", None))
    if handoff is None or handoff.keys() is not key or handoff.slots() is None:
        return None
    return handoff


def slot_attention_torch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         slots: SlotState, scaling: float,
                         matmul_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """softmax(scaling * q . k'_j + b_j) . v'_j over every key row j, softmax in float32.

    Outside the ring rows k' = k, v' = v and b = 0; on them k' = C k and v' = C v, with C the
    plan's band-limiting circulant (identity without masks), and b = log(count) (the mass). C is
    real and symmetric and attention is linear in k' and v', so C is applied to the ring rows'
    logits and, after the softmax, to their probabilities: O(M log M) per query head instead of
    an FFT over (M, head_dim) rows and a slot tensor written every step.

    query (batch, heads, 1, head_dim); key, value (batch, kv_heads, rows, head_dim) ->
    (batch, 1, heads, head_dim). matmul_dtype: the q.k and p.v products (float32: the
    definition `kernels.SlotAttention` matches; the model's dtype: eager attention's
    rounding, no float32 copy of the rows)."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    ring = slice(slots.start, slots.start + slots.count)
    bias = slots.column_bias(key.shape[-2], query.device)
    grouped = query.to(matmul_dtype).reshape(batch, kv_heads, heads // kv_heads * length, dim)
    logits = (grouped @ key.to(matmul_dtype).transpose(-1, -2)).float()
    if slots.masks is not None:
        key_mask, value_mask = slots.masks.transpose(-1, -2)   # (1, kv_heads or 1, 1, M//2 + 1)
        logits[..., ring] = band_limit(logits[..., ring], key_mask)
    weights = torch.softmax(logits * scaling + bias, dim=-1)
    if slots.masks is not None:
        weights[..., ring] = band_limit(weights[..., ring], value_mask)
    out = weights.to(matmul_dtype) @ value.to(matmul_dtype)
    return out.reshape(batch, heads, length, dim).transpose(1, 2).to(query.dtype)


def slot_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: SlotState,
                   scaling: float | None = None, **_) -> tuple[torch.Tensor, None]:
    """One decode token over FAEDKVCache's stored [sink | ring means | window]: Triton's split-KV
    kernel where it runs, else `slot_attention_torch` in float32. With plan masks the torch one
    runs, its products in the model's dtype on CUDA (a fused kernel cannot filter logits across
    splits before the softmax). No mask is read: the cache serves unpadded batches and one query
    token, which sees every row. Returns (output, None) as transformers' attention functions do."""
    from faedkv import fused
    from faedkv.decode.kernels import SlotAttention

    scaling = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
    if query.shape[-2] != 1:
        raise ValueError("slot-scaled attention serves one new token per call; FAEDKVCache "
                         "materialises the slots for longer calls")
    if slots.masks is not None:
        matmul_dtype = key.dtype if key.is_cuda else torch.float32
        return slot_attention_torch(query, key, value, slots, scaling, matmul_dtype), None
    kernel = slots.kernel
    if kernel is None or kernel.keys is not key or kernel.values is not value:
        if not (fused.can_fuse_decode(query) and fused.can_fuse_decode(key) and fused.can_fuse_decode(value)):
            return slot_attention_torch(query, key, value, slots, scaling), None
        kernel = slots.kernel = SlotAttention(key, value, slots.start, slots.count, workspace=slots.workspace)
    out = query.new_empty(query.shape[0], 1, query.shape[1], query.shape[-1])
    kernel(out, query, slots.filled, slots.more, slots.less, scaling)
    return out, None
