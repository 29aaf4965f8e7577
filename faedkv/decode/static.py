"""StaticFAEDKVCache: FAEDKVCache's decoding as a fixed-shape step, for torch.compile and CUDA graphs.

Per layer the same rows as FAEDKVCache (faedkv.decode.cache: same budget, same math), in two
buffers (keys, values) of (batch, kv_heads, S + M + W, head_dim) allocated at the prefill:

    [ sink (S) ][ ring means (M) ][ window ring (W) ]

and the decode state in device tensors of fixed shape: `folded` (middle tokens inside the ring
means), `head` (the window's oldest row) and `bias` (1, 1, 1, S + M + W), every row's logit bias:
0 for sink and window, log(count) for ring row r, the mean of `count` middle tokens (the mass).
Every ring row holds at least one token from the prefill on (the middle is longer than M).

The prefill of T tokens runs eagerly and attends exactly; it stores the sink, the ring means of
the middle (`ring_means`) and the window, laid out as FAEDKVCache lays them out (faedkv.budget).
A decode call of one token is a fixed sequence of tensor operations on those tensors, updated in
place, with no Python number that changes per token and no host sync, so a compiler traces it
once and a CUDA graph replays it: the oldest window token joins ring row folded mod M as a
running mean (m <- lerp(m, x, 1 / count), float32 for bf16, rounded once, as FAEDKVCache folds),
the new token takes its window row, that ring row's bias becomes log of its new count, and
`folded` and `head` advance. Attention over post-RoPE keys does not depend on their order, so the
buffers are attended as they are stored.

The bias reaches attention through faedkv_static_sdpa, registered with transformers
(AttentionInterface, with sdpa's mask function). The prefill hands each layer to faedkv's
attention (a faedkv.decode.slots.Handoff, in place; an sdpa model is switched to faedkv_sdpa
by it, see faedkv.attention), whose call `StaticFAEDKVLayer.attend` checks that the batch is
unpadded, attends exactly (sdpa's causal path), marks the attention module with a weak reference
to the layer and switches the model config to faedkv_static_sdpa. From then on that attention
hands sdpa the layer's `bias` as its float mask whenever the keys it gets are the layer's buffer
(a plain attribute read and an identity test, which torch.compile traces without a graph break);
any other keys go to faedkv_sdpa. The mask transformers built is not read: one new token of an
unpadded batch sees every row. Eager (or flash) attention would drop the bias, and a cache
prefilled later on the same model takes its attention modules over: the first decode call of
the cache left without its bias raises instead. `faedkv.attention.restore_sdpa(config)` switches a model
back to sdpa.

`model.generate(ids, past_key_values=StaticFAEDKVCache(...), compile_config=CompileConfig())`
compiles the one-token forward as it does for transformers' StaticCache: the cache is
`is_compileable` from the start (generate decides before the prefill creates the layers), so on
CUDA generate runs the prefill eagerly and the decode steps through torch.compile (CompileConfig's
default mode "reduce-overhead": CUDA graphs; without a compile_config too, `disable_compile=True`
decodes eagerly); transformers compiles nothing on CPU. For a second call, `reset()` the cache
and pass it again: a prefill of the same length writes into the same buffers (their addresses
are marked static), so the compiled step and its CUDA graphs are reused; a new cache's buffers
make the graphs re-record.

`get_seq_length()` is the number of tokens seen, a 0-dim device tensor (as transformers'
StaticLayer's, no host sync); `get_mask_sizes` reports the S + M + W rows at offset 0, as a
StaticLayer does: every row stands for a position before the new token's.
Limits: one token per decode call (generate's greedy and sampling decode); post-RoPE keys and the
iwdft variant; no plan (band-limiting the ring means would take FAEDKVCache's eager slots or its
plan attention); unpadded batches; full attention (no sliding window); a window of at least one
row; one StaticFAEDKVCache decoding per model at a time; no beam search, no cropping.
"""
from __future__ import annotations

import weakref

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from faedkv import attention
from faedkv.attention import FAEDKV_STATIC_SDPA, faedkv_sdpa_attention, log_mass
from faedkv.budget import layout
from faedkv.decode.cache import FAEDKVLayerBase, refuse_padding, ring_counts, ring_means
from faedkv.decode.slots import Handoff, post
from faedkv.iwdft import compute_dtype

LAYER_ATTR = "faedkv_static_layer"   # on an attention module: weakref to the StaticFAEDKVLayer it reads


def static_sdpa_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """sdpa over a StaticFAEDKVLayer's buffer with the layer's log-count bias as the mask, when
    `key` is that buffer (the layer this module was linked to at the prefill); faedkv_sdpa for
    any other keys (a prefill's, another cache's)."""
    link = getattr(module, LAYER_ATTR, None)
    layer = link() if link is not None else None
    if layer is None or key is not layer.stored_keys:
        return faedkv_sdpa_attention(module, query, key, value, attention_mask, *args, **kwargs)
    return attention._SDPA(module, query, key, value, layer.bias, *args, **kwargs)


AttentionInterface.register(FAEDKV_STATIC_SDPA, static_sdpa_attention)
AttentionMaskInterface.register(FAEDKV_STATIC_SDPA, sdpa_mask)


def shortest_prefill(compression_ratio: float, sink_tokens: int, window: int) -> int:
    """Fewest prompt tokens whose layout keeps a ring mean and a window row."""
    tokens = 1
    while not fits(layout(tokens, compression_ratio, sink_tokens, window)):
        tokens += 1
    return tokens


def fits(kept) -> bool:
    return kept.slots > 0 and kept.window > 0


class StaticFAEDKVLayer(FAEDKVLayerBase):
    """One layer's [sink | ring means | window ring] buffers and decode state, written in place."""

    is_compileable = True

    def __init__(self, layer_idx: int, compression_ratio: float, sink_tokens: int, window: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.compression_ratio = compression_ratio
        self.asked = (sink_tokens, window)
        # as used: a short prefill shrinks sink and window
        self.sink_tokens, self.window, self.num_slots = sink_tokens, window, 0
        self.stored_keys = self.stored_values = None   # (batch, kv_heads, S + M + W, head_dim)
        self.folded = self.head = None                  # () int64: middle tokens folded; the window's oldest row
        self.bias = None                                # (1, 1, 1, S + M + W): each row's logit bias
        self.keys = self.values = None                  # not a plain cache: kvpress's slicing must fail
        self.config = None                              # the model config whose attention read this layer
        self.module = None                              # weakref to the attention module linked to this layer

    # --- what faedkv_sdpa calls (the Handoff protocol) --------------------------------------
    def served_by(self, config) -> None:
        self.config = config

    def attend(self, module, query, key, value, attention_mask=None, **kwargs):
        """faedkv_sdpa's call for the prefill's handoff: exact causal attention over the prompt;
        then `module` reads this layer through faedkv_static_sdpa."""
        if kwargs.get("sliding_window") is not None:
            raise ValueError("StaticFAEDKVCache serves full-attention layers only, not a sliding window")
        refuse_padding(attention_mask, "StaticFAEDKVCache")
        setattr(module, LAYER_ATTR, weakref.ref(self))
        self.module = weakref.ref(module)
        module.config._attn_implementation = FAEDKV_STATIC_SDPA
        # Unpadded, the mask transformers built for this compileable cache (it skips none) is the
        # causal one: sdpa's causal path does without reading T x T of it
        return attention._SDPA(module, query, key, value, None, **kwargs)

    def linked_layer(self):
        """The layer this layer's attention module reads (this one, unless a cache prefilled since
        took the module), or None."""
        module = self.module() if self.module is not None else None
        link = getattr(module, LAYER_ATTR, None)
        return link() if link is not None else None

    # --- CacheLayerMixin ------------------------------------------------------------------
    def update(self, key_states, value_states, cache_kwargs=None):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.prefill(key_states, value_states)
            post(self.layer_idx, Handoff.of(key_states, self, in_place=True))
            return key_states, value_states
        if key_states.shape[-2] != 1:
            raise ValueError(f"StaticFAEDKVCache decodes one token per call, got {key_states.shape[-2]}; "
                             "FAEDKVCache serves longer calls")
        if getattr(self.config, "_attn_implementation", None) != FAEDKV_STATIC_SDPA:
            raise ValueError("StaticFAEDKVCache needs its log-count bias added by faedkv's attention: load the "
                             "model with attn_implementation='sdpa' (eager and other attentions would attend "
                             "the ring means without their mass)")
        if self.linked_layer() is not self:
            raise ValueError("the model's attention reads another StaticFAEDKVCache, prefilled after this one: "
                             "decode one StaticFAEDKVCache at a time per model (a cache reset and prefilled again "
                             "takes the model's attention back)")
        self.step(key_states, value_states)
        return self.stored_keys, self.stored_values

    def prefill(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values (batch, kv_heads, T, head_dim): sink, ring means of the middle and window
        into the buffers (reused when a reset cache is prefilled with as many tokens)."""
        if keys.shape != values.shape:
            raise ValueError(f"StaticFAEDKVCache needs keys and values of one shape, got keys "
                             f"{tuple(keys.shape)} and values {tuple(values.shape)}")
        tokens = keys.shape[-2]
        kept = layout(tokens, self.compression_ratio, *self.asked)
        if not fits(kept):
            raise ValueError(f"StaticFAEDKVCache needs a prefill of at least "
                             f"{shortest_prefill(self.compression_ratio, *self.asked)} tokens at compression_ratio="
                             f"{self.compression_ratio}, sink_tokens={self.asked[0]}, window={self.asked[1]} "
                             f"(one ring mean and one window row), got {tokens}")
        s, m, w = kept.sink, kept.slots, kept.window
        self.sink_tokens, self.window, self.num_slots = s, w, m
        self.allocate(keys, s + m + w)
        for buffer, x in ((self.stored_keys, keys), (self.stored_values, values)):
            buffer[:, :, :s] = x[:, :, :s]
            buffer[:, :, s:s + m] = ring_means(x[:, :, s:tokens - w], m)
            buffer[:, :, s + m:] = x[:, :, tokens - w:]
        folded = tokens - s - w
        self.folded.fill_(folded)
        self.head.zero_()
        self.bias.zero_()
        self.bias[..., s:s + m] = log_mass(ring_counts(folded, m, keys.device)).to(self.bias.dtype)

    def allocate(self, keys: torch.Tensor, rows: int) -> None:
        """The buffers and state for `rows` rows, unless the ones held have that shape already.
        Their addresses are static: a compiled step reads and writes them in place."""
        shape = keys.shape[:2] + (rows, keys.shape[-1])
        held = self.stored_keys
        if held is not None and (held.shape, held.dtype, held.device) == (shape, keys.dtype, keys.device):
            return
        self.stored_keys, self.stored_values = keys.new_empty(shape), keys.new_empty(shape)
        self.bias = keys.new_zeros((1, 1, 1, rows))
        self.folded = torch.zeros((), dtype=torch.long, device=keys.device)
        self.head = torch.zeros((), dtype=torch.long, device=keys.device)
        for tensor in self.persistent_tensors():
            torch._dynamo.mark_static_address(tensor)

    def step(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """One token (batch, kv_heads, 1, head_dim): the oldest window token joins ring row
        folded mod M, the new token takes its window row."""
        s, m = self.sink_tokens, self.num_slots
        count = self.folded // m + 1                      # the ring row's tokens once this one is in
        slot = (s + self.folded % m).view(1)              # buffer row of that ring mean
        oldest = (s + m + self.head).view(1)              # buffer row of the window's oldest token
        weight = (1 / count.double()).to(compute_dtype(key_states.dtype))   # FAEDKVCache's 1 / count
        for buffer, new in ((self.stored_keys, key_states), (self.stored_values, value_states)):
            mean = buffer.index_select(-2, slot).to(weight.dtype)
            leaving = buffer.index_select(-2, oldest).to(weight.dtype)
            buffer.index_copy_(-2, slot, mean.lerp(leaving, weight).to(buffer.dtype))
            buffer.index_copy_(-2, oldest, new)
        self.bias.index_copy_(-1, slot, log_mass(count).to(self.bias.dtype).view(1, 1, 1, 1))
        self.folded.add_(1)
        self.head.copy_((self.head + 1) % self.window)

    def reset(self) -> None:
        """Forget the tokens and keep the buffers, for the next prefill to reuse."""
        self.is_initialized = False
        self.config = self.module = None

    def get_seq_length(self) -> torch.Tensor | int:
        """Tokens seen: S + W + folded (a 0-dim device tensor once prefilled)."""
        if not self.is_initialized:
            return 0
        return self.folded + (self.sink_tokens + self.window)

    def get_mask_sizes(self, cache_position: torch.Tensor | int) -> tuple[int, int]:
        # transformers 5.2 passes cache_position, later versions the query length. Decoding, the
        # columns stand for positions 0..S+M+W-1, all before the new token's (a StaticLayer's
        # convention), so its causal mask lets it see every row.
        if not self.is_initialized:
            return (cache_position if isinstance(cache_position, int) else cache_position.shape[0]), 0
        return self.max_cache_len, 0

    @property
    def max_cache_len(self) -> int:
        return self.stored_keys.shape[-2]

    def get_max_cache_shape(self) -> int:
        return self.max_cache_len if self.is_initialized else -1

    def persistent_tensors(self) -> list[torch.Tensor]:
        parts = (self.stored_keys, self.stored_values, self.bias, self.folded, self.head)
        return [t for t in parts if t is not None]

    def stored_length(self) -> int:
        """Rows stored: S + M + W once prefilled."""
        return self.max_cache_len if self.is_initialized else 0


class StaticFAEDKVCache(Cache):
    """FAEDKVCache's sink + ring means + window per layer, decoded as a fixed-shape step that
    torch.compile traces in one graph and CUDA graphs replay.

        cache = StaticFAEDKVCache(compression_ratio=0.75, sink_tokens=4, window=64)
        model.generate(input_ids, past_key_values=cache, max_new_tokens=200,
                       compile_config=CompileConfig())      # compiled on CUDA
        cache.reset()                                       # before passing it to the next call

    compression_ratio in (0, 1): fraction of the prefill removed (M from the press's budget rule).
    The rows, folds and mass are FAEDKVCache's (greedy decoding gives its tokens). A plan, a ratio
    of 0 (use a StaticCache), a window of no row, a prefill too short for one ring mean and one
    window row, a padded batch, an attention other than sdpa and a decode call of more than one
    token raise ValueError.
    """

    is_compileable = True   # from the start: generate decides to compile before the prefill creates the layers

    def __init__(self, compression_ratio: float = 0.5, sink_tokens: int = 4, window: int = 64, plan=None):
        if not 0 < compression_ratio < 1:
            raise ValueError(f"compression_ratio must be in (0, 1) (the fraction removed; 0 would keep every "
                             f"token: use transformers' StaticCache), got {compression_ratio}")
        if sink_tokens < 0 or window < 1:
            raise ValueError(f"StaticFAEDKVCache needs sink_tokens >= 0 and window >= 1 (each new token is "
                             f"written into the window ring), got {sink_tokens} and {window}")
        if plan is not None:
            raise ValueError("StaticFAEDKVCache takes no plan: band-limiting the ring means needs the slots "
                             "rebuilt or the plan's circulant applied in attention every step; use "
                             "FAEDKVCache(plan=...)")
        self.compression_ratio = compression_ratio
        self.sink_tokens = sink_tokens
        self.window = window
        super().__init__(layers=[])

    def update(self, key_states, value_states, layer_idx: int, cache_kwargs=None):
        while len(self.layers) <= layer_idx:
            self.layers.append(StaticFAEDKVLayer(len(self.layers), self.compression_ratio, self.sink_tokens,
                                                 self.window))
        return self.layers[layer_idx].update(key_states, value_states, cache_kwargs)

    def stored_lengths(self) -> list[int]:
        """Rows stored per layer between forward calls (S + M + W once prefilled)."""
        return [layer.stored_length() for layer in self.layers]

    def memory_bytes(self) -> int:
        """Bytes of every tensor the cache holds between forward calls, all layers: FAEDKVCache's
        S + M + W rows, and per layer the (S + M + W) bias and two counters."""
        return sum(layer.memory_bytes() for layer in self.layers)
