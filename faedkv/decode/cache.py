"""FAEDKVCache: a transformers Cache for generation with a fixed FAEDKV budget.

Per layer it keeps the first `sink_tokens` tokens exact, the middle as M ring rows, and the last
`window` tokens exact; attention sees

    [ sink (S) ][ slots (M) ][ window (W) ]      S + M + W rows, constant

The prefill of T tokens attends exactly (the model sees all T keys) and is then stored
compressed with M = max(1, int((1 - ratio) * T)) - S - W (kvpress's budget, faedkv.budget). Every later call of
q tokens first folds the q oldest window tokens into the middle, then appends its own tokens,
so decoding keeps exactly S + M + W rows. A call's own tokens are never folded before it
attends to them: when q > W the window holds q rows until the next call folds the excess.

The middle is stored in the time domain, which holds the same information as the IWDFT state
(spec: S_t = fft(sums by distance) / t): per layer ONE buffer `means (2, batch, kv_heads, M,
head_dim)` (keys, values) in the cache's dtype whose row r is the MEAN of the middle tokens with
index i = r (mod M) (ring order), and `folded`; the counts per row follow from `folded`. Means,
not sums: a bf16 running mean stays accurate where a bf16 sum would not. Folding a token updates
one row (O(head_dim) per head, one lerp kernel): no FFT, nothing done to the other rows.

Attention over cached post-RoPE keys does not depend on their order, so the slots are handed in
ring order: slot_r is mean_r, the spec's class mean at distance (folded - r) mod M, and its
logit gets + log count_r (the mass, which the layer hands faedkv's attention with the keys: a
`faedkv.decode.slots.Handoff`). A plan band-limits the ring means (masks are
conjugate-symmetric, so masking commutes with the reversal and shift from ring to distance
order). [sink | slots | window] is written into a fresh tensor on every call and not kept, so
only one layer's copy is alive.

Per layer the three parts live in ONE buffer `kv (2, batch, kv_heads, S + M + W, head_dim)`
(`sink`, `means` and the window `ring` are views of it), so memory is S + M + W rows. How a
layer serves its decode calls is chosen once, at its prefill (`TorchSteps`, `KernelSteps`,
`InPlaceSteps`). A decode step is launch-bound, so on CUDA (with Triton) a call of
q <= min(W, M) tokens without a plan is one kernel per layer
(faedkv.decode.kernels.decode_step_into): fold, slots, window and new tokens written in one
pass, the window kept as a ring (`head` = its oldest row) whose folded rows take the new
tokens. When the model runs faedkv's attention (faedkv.attention, FAEDKV_SDPA), a one-token call
does not even write the slots: it folds (FoldStep, O(head_dim) per head) and hands attention
the buffer itself with the layer's `SlotState` (the ring means' log counts); the attention adds
each mean's log count to its logit. With a plan it also band-limits: the slots are C means for
a symmetric circulant C, so the attention applies C to the ring rows' logits and, after the
softmax, to their probabilities (an FFT over M numbers per query head, not over the M rows of
every head_dim). The torch path below defines the result; both kernels match it.

The mass needs faedkv's attention: every tensor of keys this cache returns is handed over, and
on an sdpa model those keys switch the config to faedkv_sdpa themselves (faedkv.attention).
Eager attention does not read the handoff: use sdpa (the default of analysis.models.load_model).

`get_seq_length()` is the number of tokens seen (true positions for RoPE and cache_position);
`get_mask_sizes` reports the rows actually returned, offset so the causal mask lines up.
Limits: post-RoPE keys and the iwdft variant only; unpadded batches (every row the same length);
`layer.keys` / `layer.values` are None once compressed (kvpress's pipeline slices them).
The slot-scaled handoff needs faedkv's attention on the model for the whole generation: the
layer checks the model config's attention before every such call.
"""
from __future__ import annotations

from abc import abstractmethod

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from faedkv import fused as fused_kernels
from faedkv.attention import FAEDKV_SDPA, log_mass
from faedkv.budget import layout
from faedkv.decode import kernels
from faedkv.decode.slots import Handoff, SlotState, post
from faedkv.iwdft import band_limit, compute_dtype, symmetric_keep
from faedkv.plans import FrequencyPlan, bin_frequencies


def ring_means(x: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Means of the tokens with index i = r (mod num_rows), in x's dtype.

    x: (batch, kv_heads, tokens, head_dim) -> (batch, kv_heads, num_rows, head_dim). Reads x
    once (reshape-sum over full periods, accumulated in float32 for bf16/fp16); a row without
    tokens has mean 0.
    """
    tokens, dim = x.shape[-2], x.shape[-1]
    periods, remainder = divmod(tokens, num_rows)
    sums = x.new_zeros(x.shape[:-2] + (num_rows, dim), dtype=compute_dtype(x.dtype))
    if periods:
        full = x[..., : periods * num_rows, :].reshape(x.shape[:-2] + (periods, num_rows, dim))
        torch.sum(full, dim=-3, dtype=sums.dtype, out=sums)
    if remainder:
        sums[..., :remainder, :] += x[..., periods * num_rows:, :]
    counts = ring_counts(tokens, num_rows, x.device).clamp(min=1).unsqueeze(-1)
    return (sums / counts).to(x.dtype)


def ring_counts(tokens: int, num_rows: int, device=None) -> torch.Tensor:
    """(num_rows,) int64: how many of `tokens` consecutive indices fall into each ring row."""
    laps, filled = divmod(tokens, num_rows)
    return laps + (torch.arange(num_rows, device=device) < filled).long()


def refuse_padding(attention_mask: torch.Tensor | None, cache_name: str) -> None:
    """ValueError if a call's mask (batch, 1, q, columns) hides a column from its last query:
    padding hides a column from every query, and the last one sees every column of an unpadded
    batch causally. None is sdpa's 'causal, no padding'."""
    if attention_mask is None:
        return
    last = attention_mask[..., -1, :]
    visible = last if last.dtype == torch.bool else last == 0
    if not bool(visible.all()):
        raise ValueError(f"{cache_name} serves unpadded batches only (every row the same length, no "
                         "attention-mask padding): run the prompts one at a time or of equal length")


def half_spectrum_mask(keep: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Bin mask (M,) or (kv_heads, M) -> the rfft half (kv_heads or 1, M//2 + 1, 1),
    conjugate-symmetric."""
    half = symmetric_keep(keep)[..., : num_rows // 2 + 1]
    return half.reshape(-1, half.shape[-1], 1)


class TorchSteps:
    """Every decode call in torch: the layer materialises [sink | slots | window | new] (the
    definition; fused=False, or tensors no kernel runs on)."""

    def __call__(self, layer: FAEDKVLayer, keys: torch.Tensor, values: torch.Tensor):
        return layer.torch_step(keys, values)


class KernelSteps:
    """No plan, on a device Triton runs on: a call of q <= min(W, M) tokens while the window is
    its W-row ring runs as kernels, one token under faedkv's attention as the in-place handoff
    (fold only), any other as the one-kernel step; longer calls take the torch path."""

    def __call__(self, layer: FAEDKVLayer, keys: torch.Tensor, values: torch.Tensor):
        query = keys.shape[-2]
        if layer.long_window is None and query <= layer.kernel_tokens:
            if query == 1 and layer.slot_attention_ready():
                return layer.in_place_step(keys, values)
            return layer.one_kernel_step(keys, values)
        return layer.torch_step(keys, values)


class InPlaceSteps:
    """With a plan, on a device Triton runs on: only the in-place handoff runs as a kernel (the
    attention band-limits the ring rows; the one-kernel step would write unfiltered slots)."""

    def __call__(self, layer: FAEDKVLayer, keys: torch.Tensor, values: torch.Tensor):
        if (keys.shape[-2] == 1 and layer.kernel_tokens >= 1 and layer.long_window is None
                and layer.slot_attention_ready()):
            return layer.in_place_step(keys, values)
        return layer.torch_step(keys, values)


class FAEDKVLayerBase(CacheLayerMixin):
    """What FAEDKVCache's layers share: tokens seen (true positions), the mask sizes of the rows
    returned, the bytes held, no beam search or cropping."""

    is_sliding = False
    is_compileable = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    @abstractmethod
    def persistent_tensors(self) -> list[torch.Tensor]:
        """The tensors held between calls (their bytes are the cache's)."""

    @abstractmethod
    def stored_length(self) -> int:
        """Rows stored between calls."""

    def fold_count(self, query: int) -> int:
        """Stored rows a call of `query` tokens folds before it attends."""
        return 0

    def memory_bytes(self) -> int:
        """Bytes of the storages behind the persistent tensors (a view that pinned a larger
        tensor would count that tensor in full), each storage once."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in self.persistent_tensors()}
        return sum(storages.values())

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, cache_position: torch.Tensor | int) -> tuple[int, int]:
        # transformers 5.2 passes cache_position; later versions (5.17 on the GPU image) pass
        # the query length
        query = cache_position if isinstance(cache_position, int) else cache_position.shape[0]
        if self.seen == 0:
            return query, 0
        past = self.stored_length() - self.fold_count(query)
        # Column j stands for position kv_offset + j: the last `query` columns are the new tokens
        # at their true positions (cache_position[0] == seen; read from the host, reading the
        # tensor would sync the device every step) and every cached row lies in their past.
        return past + query, self.seen - past

    def get_max_cache_shape(self) -> int:
        return -1

    def get_max_length(self) -> int:
        """No maximum (abstract in later transformers, 5.17 on the GPU image)."""
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("FAEDKVCache does not support beam search (its state mixes tokens); "
                         "use greedy or sampling")

    def crop(self, max_length: int) -> None:
        raise ValueError("FAEDKVCache cannot be cropped: folded tokens cannot be taken back out "
                         "of the IWDFT state (assisted / speculative decoding is not supported)")


class ExactLayer(FAEDKVLayerBase):
    """compression_ratio=0: every token kept (a plain growing cache), keys handed over unmarked."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.seen = 0

    def update(self, key_states, value_states, cache_kwargs=None):
        if self.seen == 0:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        return self.keys, self.values

    def persistent_tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.keys, self.values) if t is not None]

    def stored_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def reset(self) -> None:
        self.__init__(self.layer_idx)


class FAEDKVLayer(FAEDKVLayerBase):
    """One layer's sink + ring means of the middle + window.

    Keys and values live stacked in one tensor per part, (2, batch, kv_heads, rows, head_dim)
    (index 0 keys, 1 values), so each step is a handful of kernels whatever the model: a decode
    step is launch-bound long before it is bandwidth-bound on the slot part. The window is the
    W-row `ring` of the buffer (oldest row `head`), except after a call of q > W tokens: then
    `long_window` holds those q rows oldest first until the next call folds the excess.
    """

    def __init__(self, layer_idx: int, compression_ratio: float, sink_tokens: int, window: int,
                 plan: FrequencyPlan | None = None, fused: bool | None = None,
                 workspace: dict | None = None):
        super().__init__()
        self.workspace = workspace   # scratch shared by the cache's layers (slot attention)
        self.layer_idx = layer_idx
        self.compression_ratio = compression_ratio
        self.sink_tokens = sink_tokens
        self.window = window
        self.asked = (sink_tokens, window)   # what a reset restores (a short prefill shrinks them)
        self.plan = plan
        self.fused = fused
        self.seen = 0            # tokens this layer has been given
        self.folded = 0          # middle tokens inside the ring means
        self.num_slots = 0
        self.kv = None           # (2, batch, kv_heads, S + M + W, head_dim): sink | means | window
        self.sink = self.means = self.ring = None     # (2, batch, kv_heads, rows, head_dim) views of kv
        self.head = 0            # oldest row of `ring` (a ring once a kernel step has run)
        self.long_window = None  # (2, batch, kv_heads, q > W, head_dim) oldest first, or None
        self.masks = None        # (2, 1, kv_heads or 1, M//2 + 1, 1) rfft-half plan masks; None: all
        self.steps = None        # TorchSteps | KernelSteps | InPlaceSteps, chosen at the prefill
        self.kernel_tokens = 0   # calls of up to this many tokens may run as kernels: min(W, M)
        self.fold_step = None    # kernels.FoldStep over means and ring, once used
        self.slot_state = None   # SlotState: the ring means as faedkv's attention reads them
        self.stored_keys = self.stored_values = None   # kv[0], kv[1]: what the in-place handoff returns
        self.in_place = None     # the Handoff of those, posted on every in-place step

    # --- views for readers (tests, analyses) -----------------------------------------------
    sink_keys = property(lambda self: self.sink[0])
    sink_values = property(lambda self: self.sink[1])
    mean_keys = property(lambda self: self.means[0])
    mean_values = property(lambda self: self.means[1])
    window_keys = property(lambda self: self.chronological_window()[0])
    window_values = property(lambda self: self.chronological_window()[1])

    def chronological_window(self) -> torch.Tensor:
        """The window (2, batch, kv_heads, rows, head_dim) oldest first."""
        if self.long_window is not None:
            return self.long_window
        return self.ring if self.head == 0 else self.ring.roll(-self.head, dims=-2)

    @property
    def counts(self) -> torch.Tensor:
        """(M,) int64 middle tokens per ring row: indices 0..folded-1 fill the rows in turn, so
        the counts follow from `folded` alone and need no storage or per-step update."""
        return ring_counts(self.folded, self.num_slots, self.means.device)

    # --- the three parts ------------------------------------------------------------------
    def plan_masks(self, heads: int) -> torch.Tensor | None:
        if self.plan is None:
            return None
        freqs = bin_frequencies(self.num_slots)
        masks = [half_spectrum_mask(self.plan.keep_some_frequencies(self.layer_idx, freqs, kind, heads),
                                    self.num_slots) for kind in ("key", "value")]
        masks = torch.broadcast_tensors(*masks)
        return torch.stack(masks).unsqueeze(1).to(self.device)

    def prefill(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values (batch, kv_heads, T, head_dim): copies of sink and window (a view would
        keep the whole prefill alive) and the ring means of the middle, into one buffer; the
        decode steps chosen for them."""
        if keys.shape != values.shape:
            raise ValueError(f"FAEDKVCache stores keys and values together and needs them of one "
                             f"shape, got keys {tuple(keys.shape)} and values {tuple(values.shape)}; "
                             "use a model whose value head_dim equals its key head_dim")
        tokens, heads = keys.shape[-2], keys.shape[1]
        kept = layout(tokens, self.compression_ratio, self.sink_tokens, self.window)
        if kept.slots == 0:
            raise ValueError(f"FAEDKVCache cannot compress a {tokens}-token prefill at compression_ratio="
                             f"{self.compression_ratio} (it keeps all {kept.rows} rows); prefill more tokens")
        # a short prefill shrinks the window, then the sink (faedkv.budget); they stay that size
        s, w, m = kept.sink, kept.window, kept.slots
        self.sink_tokens, self.window, self.num_slots = s, w, m
        self.kv = keys.new_empty((2,) + keys.shape[:2] + (s + m + w, keys.shape[-1]))
        self.sink, self.means, self.ring = self.kv[..., :s, :], self.kv[..., s:s + m, :], self.kv[..., s + m:, :]
        for index, x in enumerate((keys, values)):
            self.sink[index] = x[:, :, :s]
            self.means[index] = ring_means(x[:, :, s:tokens - w], m)
            self.ring[index] = x[:, :, tokens - w:]
        self.folded = tokens - s - w
        self.masks = self.plan_masks(heads)
        self.slot_state = SlotState(s, m, masks=self.masks, workspace=self.workspace)
        self.slot_state.advance(self.folded)
        self.stored_keys, self.stored_values = self.kv[0], self.kv[1]
        self.in_place = Handoff.of(self.stored_keys, self.slot_state, in_place=True)
        self.kernel_tokens = min(w, m)
        if not self.kernels_run_on(keys, values):
            self.steps = TorchSteps()
        else:
            self.steps = KernelSteps() if self.masks is None else InPlaceSteps()

    def kernels_run_on(self, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """The decode kernels run on the prefill's tensors (a model's decode calls have their
        dtype and layout): fused=None: CUDA with Triton; True: also Triton's CPU interpreter;
        False: never."""
        if self.fused is False or (self.fused is None and not keys.is_cuda):
            return False
        return (keys.dtype == values.dtype and fused_kernels.can_fuse_decode(keys)
                and fused_kernels.can_fuse_decode(values))

    def fold_count(self, query: int) -> int:
        """Old window tokens to fold so that `query` new tokens fit in the window."""
        held = self.window_rows()
        return min(held, max(0, held + query - self.window))

    def fold(self, tokens: torch.Tensor) -> None:
        """Move the oldest window tokens (2, batch, kv_heads, k, head_dim) into the ring means, at
        most M at a time (tokens M apart share a row)."""
        for start in range(0, tokens.shape[-2], self.num_slots):
            self.fold_run(tokens[..., start:start + self.num_slots, :])

    def fold_run(self, x: torch.Tensor) -> None:
        """Fold k <= M consecutive middle tokens x (2, batch, kv_heads, k, head_dim).

        Middle index j lands in row j mod M as that row's (j // M + 1)-th token, so
        m <- m + (x - m) / count is lerp(m, x, 1 / count) (computed in float32 for bf16, rounded
        once). k <= M consecutive indices cover at most two row ranges (before and after the
        ring wraps), each with one count: one or two kernels, no host sync."""
        size, run = self.num_slots, x.shape[-2]
        row, lap = self.folded % size, self.folded // size
        first = min(run, size - row)
        self.means[..., row:row + first, :].lerp_(x[..., :first, :], 1 / (lap + 1))
        if run > first:
            self.means[..., :run - first, :].lerp_(x[..., first:, :], 1 / (lap + 2))
        self.folded += run

    def slot_rows(self, out: torch.Tensor) -> None:
        """Write the M slots (ring order) into out (2, batch, kv_heads, M, head_dim): the ring
        means, band-limited along the rows with a plan (irfft(rfft(means) * mask))."""
        if self.masks is None:
            out.copy_(self.means)
            return
        means = self.means.to(compute_dtype(self.means.dtype))
        out.copy_(band_limit(means, self.masks, dim=-2))

    def slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(key slots, value slots) (batch, kv_heads, M, head_dim) in ring order: slot r stands
        for the tokens at distance (folded - r) mod M from the newest middle token."""
        out = torch.empty_like(self.means)
        self.slot_rows(out)
        return out[0], out[1]

    def attended(self, window: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor) -> torch.Tensor:
        """[sink | slots | window | new] written once into a fresh (2, batch, kv_heads, rows, dim)."""
        s, m, w = self.sink.shape[-2], self.num_slots, window.shape[-2]
        shape = self.means.shape
        out = self.means.new_empty(shape[:3] + (s + m + w + key_states.shape[-2], shape[-1]))
        out[..., :s, :].copy_(self.sink)
        self.slot_rows(out[..., s:s + m, :])
        out[..., s + m:s + m + w, :].copy_(window)
        out[0, ..., s + m + w:, :].copy_(key_states)
        out[1, ..., s + m + w:, :].copy_(value_states)
        return out

    def materialised(self, keys: torch.Tensor) -> torch.Tensor:
        """Hand faedkv's attention keys [sink | slots | ...] with the slot rows' log counts (the mass)."""
        post(self.layer_idx, Handoff.of(keys, self.slot_state, mass=(self.sink_tokens, log_mass(self.counts))))
        return keys

    def slot_attention_ready(self) -> bool:
        """faedkv's attention served this layer and the model still runs it."""
        config = self.slot_state.config
        return config is not None and getattr(config, "_attn_implementation", None) == FAEDKV_SDPA

    # --- CacheLayerMixin ------------------------------------------------------------------
    def update(self, key_states, value_states, cache_kwargs=None):
        self.seen += key_states.shape[-2]
        if self.steps is not None:
            return self.steps(self, key_states, value_states)
        self.lazy_initialization(key_states, value_states)
        self.prefill(key_states, value_states)
        # the prefill itself attends exactly; faedkv's attention, if it reads these keys, answers
        post(self.layer_idx, Handoff.of(key_states, self.slot_state))
        return key_states, value_states

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.compression_ratio, self.asked[0], self.asked[1], self.plan,
                      self.fused, self.workspace)

    # --- the decode steps (chosen by `steps`) ----------------------------------------------
    def torch_step(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold, then [sink | slots | window | new] written in torch; the window oldest first after it."""
        window = self.chronological_window()
        overflow = self.fold_count(key_states.shape[-2])
        self.fold(window[..., :overflow, :])
        out = self.attended(window[..., overflow:, :], key_states, value_states)
        # The new window is a copy of the returned rows' tail (a view would keep `out` alive),
        # into the ring when it is W rows
        tail = out[..., out.shape[-2] - (window.shape[-2] - overflow) - key_states.shape[-2]:, :]
        if tail.shape[-2] == self.window:
            self.ring.copy_(tail)
            self.head, self.long_window = 0, None
        else:
            self.long_window = tail.clone()
        return self.materialised(out[0]), out[1]

    def one_kernel_step(self, key_states: torch.Tensor,
                        value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fold + [sink | slots | window | new] + window ring update in one kernel."""
        out = self.kv.new_empty(self.kv.shape)
        kernels.decode_step_into(out, self.sink, self.means, self.ring, key_states, value_states,
                                 self.head, self.folded)
        self.folded += key_states.shape[-2]
        self.head = (self.head + key_states.shape[-2]) % self.window
        return self.materialised(out[0]), out[1]

    def in_place_step(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold one token and hand attention the buffer [sink | ring means | window ring] with
        the rows' log counts (faedkv.decode.slots.slot_attention adds them): nothing is written
        but the folded mean row and the new token's ring row."""
        if self.fold_step is None:
            self.fold_step = kernels.FoldStep(self.means, self.ring)
        self.fold_step(key_states, value_states, self.head, self.folded)
        self.folded += 1
        self.head = (self.head + 1) % self.window
        self.slot_state.advance(self.folded)
        post(self.layer_idx, self.in_place)
        return self.stored_keys, self.stored_values

    def persistent_tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.kv, self.long_window, self.masks) if t is not None]

    def stored_length(self) -> int:
        """Rows stored between calls: S + M + W once compressed (more after a call of q > W)."""
        if self.kv is None:
            return 0
        return self.sink_tokens + self.num_slots + self.window_rows()

    def window_rows(self) -> int:
        """Rows the window holds: W, or q > W after a call of q tokens."""
        return self.window if self.long_window is None else self.long_window.shape[-2]


class FAEDKVCache(Cache):
    """Sink + ring means of the middle + recent window per layer, for `model.generate`.

        cache = FAEDKVCache(compression_ratio=0.75, sink_tokens=4, window=64)
        model.generate(input_ids, past_key_values=cache, max_new_tokens=200)

    compression_ratio: fraction of the prefill removed (M from the press's budget rule); 0 keeps
    everything (a plain growing cache). plan: FrequencyPlan of the kept bins per layer (None: all).
    fused: decode calls of q <= min(W, M) tokens without a plan run as one Triton kernel per layer
    (faedkv.decode.kernels): None on CUDA with Triton, True also under Triton's CPU interpreter
    (TRITON_INTERPRET=1, for tests), False never. With `use_faedkv_attention(model.config)`, a
    one-token call writes no slot: the attention scales (and, with a plan, band-limits) the
    stored ring means itself.
    A prefill too short for sink + window + 1 slot raises ValueError naming the minimum length.
    """

    def __init__(self, compression_ratio: float = 0.5, sink_tokens: int = 4, window: int = 64,
                 plan: FrequencyPlan | None = None, fused: bool | None = None):
        if not 0 <= compression_ratio < 1:
            raise ValueError(f"compression_ratio must be in [0, 1), got {compression_ratio}")
        if sink_tokens < 0 or window < 0:
            raise ValueError("sink_tokens and window must be >= 0")
        if plan is not None and not isinstance(plan, FrequencyPlan):
            raise ValueError("plan must be a faedkv.FrequencyPlan or None")
        self.compression_ratio = compression_ratio
        self.sink_tokens = sink_tokens
        self.window = window
        self.plan = plan
        self.fused = fused
        self.workspace = {}   # scratch the layers' slot attention shares (layers run in turn)
        super().__init__(layers=[])

    def update(self, key_states, value_states, layer_idx: int, cache_kwargs=None):
        while len(self.layers) <= layer_idx:
            index = len(self.layers)
            self.layers.append(ExactLayer(index) if self.compression_ratio == 0 else
                               FAEDKVLayer(index, self.compression_ratio, self.sink_tokens, self.window,
                                           self.plan, self.fused, self.workspace))
        return self.layers[layer_idx].update(key_states, value_states, cache_kwargs)

    def stored_lengths(self) -> list[int]:
        """Rows stored per layer between forward calls (S + M + W once compressed)."""
        return [layer.stored_length() for layer in self.layers]

    def memory_bytes(self) -> int:
        """Bytes of every tensor the cache holds between forward calls, all layers (the
        [sink | slots | window] handed to attention is transient and not counted)."""
        return sum(layer.memory_bytes() for layer in self.layers)

    def states(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(key state, value state, tokens folded into them) of one layer: the spec's complex
        IWDFT states (batch, kv_heads, M, head_dim) in distance order, rebuilt from the ring
        means (distance bin b is ring row (folded - b) mod M; state = fft(sums by distance) / t)."""
        layer = self.layers[layer_idx]
        size = layer.num_slots
        rows = (layer.folded - torch.arange(size, device=layer.means.device)) % size
        sums = layer.means.to(compute_dtype(layer.means.dtype)) * layer.counts.unsqueeze(-1)
        state = torch.fft.fft(sums.index_select(-2, rows), dim=-2) / layer.folded
        return state[0], state[1], layer.folded
