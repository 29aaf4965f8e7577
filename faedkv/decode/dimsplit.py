"""DimsplitCache: the dimension split (`FAEDKVPress(variant="dimsplit")`) as a physical store.

The press compresses the middle in bytes but hands attention T reconstructed rows. This cache
keeps what the press's bytes stand for, per layer:

    [ sink (S) exact ][ middle: N tokens, split by head dim ][ window (W) exact ][ tail ]

with S, W and the middle's budget R = B - S - W rows from `faedkv.budget.layout` (kvpress's
budget B = max(1, int(T (1 - ratio)))) and, for keys (post-RoPE) and values separately, the
press's split (`faedkv.variants.dimsplit_sizes`, `exact_dims`): the d_e exact dims' indices and
values (N rows of d_e numbers) and, for the other d - d_e dims, the lowest K rfft bins along the
N tokens (`DimsplitMiddle`). The prefill of T tokens attends exactly (the model sees its T
keys); then it is stored compressed. Decode tokens are appended exactly to a growing tail, as
kvpress's presses leave decoding to a growing cache: the middle is compressed once, at the
prefill (an N-point DFT cannot take an (N+1)th token without changing its basis).

Attention reads the store without rebuilding the middle rows (`dimsplit_attention`, float32,
torch): per query head q, the middle logits are q_e . k_e(n) + irfft(q_c . C, n=N)(n) (one
K-long complex vector, one inverse FFT of length N), softmax over every row together, and the
middle's output on the compressed dims is (1/N) sum_k a_k Re(D_k conj(P_k)), P = rfft(p) of the
middle's probabilities (a_k = 1 for bin 0 and a kept Nyquist bin, else 2: irfft's Hermitian
extension), scattered back into head_dim order with the exact dims' p . v_e.

The hybrid (exact_share > 0, scores given up front) keeps some middle tokens whole and splits
each head's others, as the press's `compress_dimsplit_rest` does. A per-layer or global pool
(KVzip's ranking) gives heads different numbers of whole tokens, so the middle is stored as
`MiddleGroup`s (all heads together when their counts agree, else one per head, batch 1), each
with its own split length, and attention joins the parts by one log-sum-exp per query.

Each update posts a `faedkv.decode.slots.Handoff` (in_place) for the keys it returns (the prefill's
own keys, then the exact rows [sink | window | tail]); faedkv_sdpa (faedkv.attention; an sdpa
model is switched to it by those keys) hands the call to the layer's `attend`. Eager attention
does not read the handoff and would silently drop the middle: the first decode call raises
instead. Unpadded batches only (the prefill's and every decode call's mask is checked); post-RoPE
keys only; no beam search, no cropping.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from faedkv.attention import FAEDKV_SDPA
from faedkv.budget import exact_token_masks, layout, split_exact
from faedkv.decode.cache import ExactLayer, FAEDKVLayerBase, refuse_padding
from faedkv.decode.slots import Handoff, post
from faedkv.variants import dimsplit_sizes, exact_dims, lowpass_band

ATTENTIONS = ("sdpa", FAEDKV_SDPA)   # implementations that read the handoff


@dataclass(eq=False)
class DimsplitMiddle:
    """One layer's middle of N tokens, keys and values stacked (index 0 keys, 1 values):

    order (2, batch, kv_heads, d) int64: the d_e exact dims (ascending), then the d - d_e
        compressed ones (ascending): column j of the stored parts is head dim order[..., j];
    exact (2, batch, kv_heads, N, d_e): the exact dims' values (the cache's dtype);
    coefficients (2, batch, kv_heads, 2K - 1, d - d_e): the compressed dims' rfft bins 0..K-1
        along the tokens, rows [Re C_0 .. Re C_{K-1} | Im C_1 .. Im C_{K-1}] (bin 0's imaginary
        part is 0 and not stored; a kept Nyquist bin's is 0 and stored), the cache's dtype.
    """
    order: torch.Tensor
    exact: torch.Tensor
    coefficients: torch.Tensor
    tokens: int
    bins: int

    @property
    def exact_dims(self) -> int:
        return self.exact.shape[-1]

    @classmethod
    def compress(cls, keys: torch.Tensor, values: torch.Tensor, rows: int, dim_share: float) -> DimsplitMiddle:
        """keys, values (batch, kv_heads, N, d): the press's split at a budget of `rows` rows
        (the same exact dims and kept bins as `faedkv.variants.compress_dimsplit`)."""
        tokens, dim = keys.shape[-2], keys.shape[-1]
        exact, bins, _ = dimsplit_sizes(tokens, rows, dim, dim_share)
        orders, exacts, coefficients = [], [], []
        for x in (keys, values):
            low, kept = lowpass_band(x, bins)
            dims = exact_dims(x, low, exact)
            is_exact = torch.zeros(x.shape[:-2] + (dim,), dtype=torch.int8, device=x.device)
            is_exact.scatter_(-1, dims, 1)
            others = torch.argsort(is_exact, dim=-1, stable=True)[..., :dim - exact]
            orders.append(torch.cat([dims, others], dim=-1))
            exacts.append(x.gather(-1, dims.unsqueeze(-2).expand(*dims.shape[:-1], tokens, exact)))
            band = kept.gather(-1, others.unsqueeze(-2).expand(*others.shape[:-1], bins, dim - exact))
            coefficients.append(torch.cat([band.real, band.imag[..., 1:, :]], dim=-2).to(x.dtype))
        return cls(torch.stack(orders), torch.stack(exacts), torch.stack(coefficients), tokens, bins)

    def tensors(self) -> list[torch.Tensor]:
        return [self.order, self.exact, self.coefficients]

    def numbers(self) -> int:
        """Values and coefficients stored, keys and values together (indices not counted)."""
        return self.exact.numel() + self.coefficients.numel()

    def spectrum(self, index: int) -> torch.Tensor:
        """The kept bins (batch, kv_heads, K, d - d_e) complex of keys (0) or values (1), float32."""
        rows = self.coefficients[index].float()
        imag = torch.cat([torch.zeros_like(rows[..., :1, :]), rows[..., self.bins:, :]], dim=-2)
        return torch.complex(rows[..., :self.bins, :], imag)

    def reconstruct(self) -> torch.Tensor:
        """(2, batch, kv_heads, N, d) float32: the rows the press hands attention (exact dims
        copied, the others irfft(C, n=N)). For tests and checks: attention never builds them."""
        parts = []
        for index in (0, 1):
            low = torch.fft.irfft(self.spectrum(index), n=self.tokens, dim=-2)
            rows = torch.cat([self.exact[index].float(), low], dim=-1)
            order = self.order[index].unsqueeze(-2).expand(rows.shape)
            parts.append(torch.empty_like(rows).scatter_(-1, order, rows))
        return torch.stack(parts)


def bin_weights(tokens: int, bins: int, device) -> torch.Tensor:
    """(K,) float32 a_k: sum_n p(n) irfft(D, n=N)(n) = (1/N) sum_k a_k Re(D_k conj(P_k)),
    P = rfft(p): 1 for bin 0 and the Nyquist bin (N even, kept), 2 for the others (their
    conjugate twins in irfft's Hermitian extension)."""
    weights = torch.full((bins,), 2.0, device=device)
    weights[0] = 1.0
    if tokens % 2 == 0 and bins == tokens // 2 + 1:
        weights[-1] = 1.0
    return weights


@dataclass(eq=False)
class MiddleGroup:
    """The middle of some KV heads (`heads`, a slice of the layer's): the dimension split of the
    tokens it summarises (`split`, over those heads; None when every middle token is kept whole)
    and the middle tokens kept whole, `keys` and `values` (batch, heads in the slice, E, d), E >= 0.
    Attention is order-free over stored rows, so the summarised tokens are split as if adjacent
    (in time order) and the whole ones stand apart."""
    heads: slice
    split: DimsplitMiddle | None
    keys: torch.Tensor
    values: torch.Tensor

    @property
    def summarised(self) -> int:
        return 0 if self.split is None else self.split.tokens

    def tensors(self) -> list[torch.Tensor]:
        return ([] if self.split is None else self.split.tensors()) + [self.keys, self.values]

    def numbers(self) -> int:
        """Values and coefficients stored, keys and values together (indices not counted)."""
        return (0 if self.split is None else self.split.numbers()) + self.keys.numel() + self.values.numel()


def split_group(keys: torch.Tensor, values: torch.Tensor, exact: torch.Tensor, rows: int, dim_share: float,
                heads: slice) -> MiddleGroup:
    """keys, values (batch, h, N, d), exact (batch, h, N) bool with the same count E in every head:
    the E tokens whole, the others split within `rows` rows (all whole if they fit, as the
    press's `faedkv.variants.compress_dimsplit_rest` keeps them)."""
    rest_keys, exact_keys = split_exact(keys, exact)
    rest_values, exact_values = split_exact(values, exact)
    if rest_keys.shape[-2] <= rows:
        return MiddleGroup(heads, None, keys.clone(), values.clone())
    split = DimsplitMiddle.compress(rest_keys, rest_values, rows, dim_share)
    # copies: views would hold the gathered middle's storage (memory_bytes counts storages)
    return MiddleGroup(heads, split, exact_keys.clone(), exact_values.clone())


def split_middle(keys: torch.Tensor, values: torch.Tensor, rows: int, dim_share: float,
                 exact: torch.Tensor | None = None) -> list[MiddleGroup]:
    """A layer's middle (batch, kv_heads, N, d) as stored groups: without `exact`, one dimension
    split of every token at `rows` rows (the press's plain split); with exact (batch, kv_heads, N)
    bool (a hybrid's tokens kept whole), one group when every head keeps the same count, else one
    group per head (batch size 1: a per-layer or global pool gives heads different counts)."""
    heads = keys.shape[1]
    if exact is None:
        split = DimsplitMiddle.compress(keys, values, rows, dim_share)
        none = keys.new_zeros(keys.shape[0], heads, 0, keys.shape[-1])
        return [MiddleGroup(slice(0, heads), split, none, none)]
    counts = exact.sum(-1)
    if bool((counts == counts.flatten()[0]).all()):
        return [split_group(keys, values, exact, rows, dim_share, slice(0, heads))]
    if keys.shape[0] != 1:
        raise ValueError("exact tokens in different numbers per head (exact_pool 'layer' or 'global') are stored "
                         "for batch size 1 only (KVzip's scores are for one sequence): run one prompt at a time "
                         "or use exact_pool='head'")
    return [split_group(keys[:, h:h + 1], values[:, h:h + 1], exact[:, h:h + 1], rows, dim_share, slice(h, h + 1))
            for h in range(heads)]


def split_logits(query: torch.Tensor, middle: DimsplitMiddle) -> torch.Tensor:
    """query (batch, h, n, d) float32 -> (batch, h, n, N) q . k for the split's N rows, without
    them: q_e . k_e(n) + irfft(q_c . C, n=N)(n)."""
    order = middle.order[0].unsqueeze(-2).expand(query.shape)
    permuted = query.gather(-1, order)
    split, bins = middle.exact_dims, middle.bins
    logits = permuted[..., :split] @ middle.exact[0].float().transpose(-1, -2)
    z = permuted[..., split:] @ middle.coefficients[0].float().transpose(-1, -2)          # (..., 2K - 1)
    imag = torch.cat([torch.zeros_like(z[..., :1]), z[..., bins:]], dim=-1)
    return logits + torch.fft.irfft(torch.complex(z[..., :bins].contiguous(), imag), n=middle.tokens, dim=-1)


def split_output(weights: torch.Tensor, middle: DimsplitMiddle) -> torch.Tensor:
    """weights (batch, h, n, N) float32 over the split's rows -> (batch, h, n, d) sum_n p(n) v(n)
    in head_dim order: p . v_e on the exact dims, (1/N) sum_k a_k Re(D_k conj(P_k)) on the others."""
    spectrum = torch.fft.rfft(weights, dim=-1)[..., :middle.bins] * bin_weights(middle.tokens, middle.bins,
                                                                                weights.device)
    folded = torch.cat([spectrum.real, spectrum.imag[..., 1:]], dim=-1) / middle.tokens    # (..., 2K - 1)
    stored = torch.cat([weights @ middle.exact[1].float(), folded @ middle.coefficients[1].float()], dim=-1)
    order = middle.order[1].unsqueeze(-2).expand(stored.shape)
    return torch.zeros_like(stored).scatter_(-1, order, stored)


def group_logits(query: torch.Tensor, group: MiddleGroup) -> torch.Tensor:
    """(batch, h, n, N_split + E): the group's split rows, then its whole ones."""
    whole = query @ group.keys.float().transpose(-1, -2)
    return whole if group.split is None else torch.cat([split_logits(query, group.split), whole], dim=-1)


def group_output(weights: torch.Tensor, group: MiddleGroup) -> torch.Tensor:
    cut = group.summarised
    out = weights[..., cut:] @ group.values.float()
    return out if group.split is None else out + split_output(weights[..., :cut], group.split)


def dimsplit_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       groups: list[MiddleGroup], scaling: float) -> torch.Tensor:
    """softmax over [middle | exact rows] of scaling * q . k, times v, without the middle's split rows.

    query (batch, heads, q, d); keys, values (batch, kv_heads, R, d): the exact rows, the call's
    q new tokens last (causal among themselves; every other row is in their past); groups: the
    stored middle (`split_middle`), whose heads may hold different numbers of rows, so the
    softmax is one log-sum-exp per query over every part. Float32 inside. -> (batch, q, heads, d)
    in query's dtype (as transformers' attention functions return). Per query head and split:
    O(K d + N d_e + N log N)."""
    batch, heads, length, dim = query.shape
    kv_heads, rows = keys.shape[1], keys.shape[-2]
    grouped = query.float().reshape(batch, kv_heads, heads // kv_heads * length, dim)
    exact_logits = (grouped @ keys.float().transpose(-1, -2)) * scaling
    if length > 1:
        newest = torch.arange(grouped.shape[-2], device=query.device) % length + (rows - length)
        hidden = torch.arange(rows, device=query.device) > newest.unsqueeze(-1)
        exact_logits = exact_logits.masked_fill(hidden, float("-inf"))
    middle_logits = [group_logits(grouped[:, g.heads], g) * scaling for g in groups]
    total = torch.logsumexp(exact_logits, dim=-1, keepdim=True)
    for group, logits in zip(groups, middle_logits):
        total[:, group.heads] = torch.logaddexp(total[:, group.heads], torch.logsumexp(logits, dim=-1, keepdim=True))
    out = torch.exp(exact_logits - total) @ values.float()
    for group, logits in zip(groups, middle_logits):
        out[:, group.heads] += group_output(torch.exp(logits - total[:, group.heads]), group)
    return out.reshape(batch, heads, length, dim).transpose(1, 2).to(query.dtype)


class DimsplitLayer(FAEDKVLayerBase):
    """One layer's sink + window + tail rows (exact, `exact_keys`/`exact_values`, growing) and
    the prefill's middle as `MiddleGroup`s (`groups`). exact: this layer's hybrid mask (batch,
    kv_heads, N) bool of middle tokens kept whole (DimsplitCache computes it from its scores),
    None for the plain split."""

    def __init__(self, layer_idx: int, compression_ratio: float, dim_share: float, sink_tokens: int,
                 window: int, exact_share: float = 0.0, exact: torch.Tensor | None = None,
                 window_share: float = 0.0):
        super().__init__()
        self.layer_idx = layer_idx
        self.compression_ratio = compression_ratio
        self.dim_share = dim_share
        self.exact_share = exact_share
        self.exact = exact
        self.window_share = window_share
        self.asked = (sink_tokens, window)
        self.sink_tokens, self.window = sink_tokens, window   # as used (a short prefill shrinks them)
        self.seen = 0
        self.groups = None            # list[MiddleGroup] once prefilled
        self.exact_keys = self.exact_values = None   # (batch, kv_heads, S + W + tail, d)
        self.keys = self.values = None                # not a plain cache: kvpress's slicing must fail
        self.config = None            # the model config whose attention read this layer (served_by)

    # --- what faedkv_sdpa calls (the Handoff protocol) --------------------------------------
    def served_by(self, config) -> None:
        self.config = config

    def attend(self, module, query, key, value, attention_mask=None, **kwargs):
        """faedkv_sdpa's call for this layer's handoff: the prefill's keys by sdpa (exact), the
        exact rows with the stored middle by `dimsplit_attention`; a padded mask raises."""
        if kwargs.get("dropout") or kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
            raise ValueError("DimsplitCache's attention has no dropout, sliding window or logit softcap")
        refuse_padding(attention_mask, "DimsplitCache")
        if key is not self.exact_keys:          # the prefill's own keys: exact attention
            from faedkv import attention

            return attention._SDPA(module, query, key, value, attention_mask, **kwargs)
        scaling = kwargs.get("scaling")
        scaling = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
        return dimsplit_attention(query, key, value, self.groups, scaling), None

    # --- CacheLayerMixin ------------------------------------------------------------------
    def update(self, key_states, value_states, cache_kwargs=None):
        self.seen += key_states.shape[-2]
        if self.groups is None:
            self.lazy_initialization(key_states, value_states)
            self.prefill(key_states, value_states)
            post(self.layer_idx, Handoff.of(key_states, self, in_place=True))
            return key_states, value_states
        if self.config is None or getattr(self.config, "_attn_implementation", None) not in ATTENTIONS:
            raise ValueError("DimsplitCache needs its store read by faedkv's attention: load the model with "
                             "attn_implementation='sdpa' (eager and other attentions would read the exact "
                             "rows only and drop the compressed middle)")
        self.exact_keys = torch.cat([self.exact_keys, key_states], dim=-2)
        self.exact_values = torch.cat([self.exact_values, value_states], dim=-2)
        post(self.layer_idx, Handoff.of(self.exact_keys, self, in_place=True))
        return self.exact_keys, self.exact_values

    def prefill(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if keys.shape != values.shape:
            raise ValueError(f"DimsplitCache needs keys and values of one shape, got {tuple(keys.shape)} "
                             f"and {tuple(values.shape)}")
        tokens = keys.shape[-2]
        kept = layout(tokens, self.compression_ratio, *self.asked, self.exact_share, self.window_share)
        if kept.slots == 0:
            raise ValueError(f"DimsplitCache cannot compress a {tokens}-token prefill at compression_ratio="
                             f"{self.compression_ratio} (it keeps all {kept.rows} rows); prefill more tokens")
        s, w = kept.sink, kept.window
        self.sink_tokens, self.window = s, w
        exact = self.exact
        if exact is not None and exact.shape != keys.shape[:2] + (kept.middle,):
            raise ValueError(f"DimsplitCache's exact_scores give layer {self.layer_idx} a mask of shape "
                             f"{tuple(exact.shape)} (batch, kv_heads, middle tokens), but its prefill of "
                             f"{tokens} tokens has shape {tuple(keys.shape[:2]) + (kept.middle,)}: score the "
                             "batch and context that you prefill")
        self.groups = split_middle(keys[:, :, s:tokens - w], values[:, :, s:tokens - w], kept.slots,
                                   self.dim_share, None if exact is None else exact.to(keys.device))
        self.exact_keys = torch.cat([keys[:, :, :s], keys[:, :, tokens - w:]], dim=-2)
        self.exact_values = torch.cat([values[:, :, :s], values[:, :, tokens - w:]], dim=-2)

    def get_mask_sizes(self, cache_position: torch.Tensor | int) -> tuple[int, int]:
        # the mask spans every position (the attention checks it for padding, then reads the
        # store, which has no column order); sdpa's mask builder returns None when unpadded
        query = cache_position if isinstance(cache_position, int) else cache_position.shape[0]
        return self.seen + query, 0

    def persistent_tensors(self) -> list[torch.Tensor]:
        parts = [self.exact_keys, self.exact_values] + [t for g in self.groups or [] for t in g.tensors()]
        return [t for t in parts if t is not None]

    def stored_length(self) -> int:
        """Exact rows stored: S + W + the tokens decoded so far."""
        return 0 if self.exact_keys is None else self.exact_keys.shape[-2]

    def equivalent_rows(self) -> float:
        """Exact rows + the middle's stored numbers / (2 d kv_heads) (keys and values, heads
        averaged), as the press's `equivalent_rows` (plus the tail); indices not counted."""
        if self.groups is None:
            return float(self.stored_length())
        dim = self.exact_keys.shape[-1]
        per_row = 2 * dim * self.exact_keys.shape[0] * self.exact_keys.shape[1]
        return self.stored_length() + sum(g.numbers() for g in self.groups) / per_row

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.compression_ratio, self.dim_share, *self.asked, self.exact_share,
                      self.exact)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("DimsplitCache does not support beam search; use greedy or sampling")

    def crop(self, max_length: int) -> None:
        raise ValueError("DimsplitCache cannot be cropped (assisted / speculative decoding is not supported)")


class DimsplitCache(Cache):
    """The dimension split stored physically, for `model.generate` on an sdpa model:

        cache = DimsplitCache(compression_ratio=0.5, dim_share=0.5)
        model.generate(input_ids, past_key_values=cache, max_new_tokens=200)

    The prefill is split as `FAEDKVPress(variant="dimsplit", dim_share=..., sink_tokens=...,
    window=..., window_share=...)` splits it (post-RoPE keys), decode tokens append exactly, and attention reads
    the split without rebuilding the middle's rows (module docstring). compression_ratio 0 keeps
    everything (a plain growing cache). A prefill too short for sink + window + 1 row raises.

    The hybrid (`FAEDKVPress(variant="dimsplit", exact_share=..., exact_pool=...)`): exact_share
    of the middle's budget keeps the middle tokens that `exact_scores` (layers, batch, kv_heads,
    T) rank highest whole, chosen per head, per layer or over every layer and head
    (`exact_pool`, faedkv.budget.exact_token_masks); each head's other middle tokens are split in
    the rest. The scores are for the T-token prefill, so they come first; KVzip's (the
    configuration the search found best):

        prefilled, scores = faedkv.kvzip.kvzip_prefill(model, context_ids)   # + KVzip's passes
        cache = DimsplitCache(0.75, exact_share=0.9, exact_scores=scores, exact_pool="global")
        cache.prefill_from(model, prefilled)                                   # no model call
        model.generate(torch.cat([context_ids, question_ids], -1), past_key_values=cache, ...)

    The scores belong to one context: `reset()` keeps them (to prefill that context again); a new
    context needs a new cache.

    `memory_bytes()`: every tensor held between calls (exact rows, exact dims' values,
    coefficients, dim indices, whole middle tokens); `stored_lengths()`: exact rows per layer;
    `equivalent_rows()`: those plus the middle's numbers in rows of d.
    """

    def __init__(self, compression_ratio: float = 0.5, dim_share: float = 0.5, sink_tokens: int = 4,
                 window: int = 64, exact_share: float = 0.0, exact_scores: torch.Tensor | None = None,
                 exact_pool: str = "head", window_share: float = 0.0):
        if not 0 <= compression_ratio < 1:
            raise ValueError(f"compression_ratio must be in [0, 1), got {compression_ratio}")
        if not 0 <= dim_share < 1:
            raise ValueError(f"dim_share must be in [0, 1) (the share of the middle budget spent on exact "
                             f"dims), got {dim_share!r}")
        if sink_tokens < 0 or window < 0:
            raise ValueError("sink_tokens and window must be >= 0")
        if not 0 <= exact_share < 1:
            raise ValueError(f"exact_share must be in [0, 1) (the middle budget's share of whole tokens), "
                             f"got {exact_share!r}")
        if not 0 <= window_share < 1:
            raise ValueError(f"window_share must be in [0, 1) (the kept rows' share in the recent window), "
                             f"got {window_share!r}")
        if (exact_share > 0) != (exact_scores is not None):
            raise ValueError("exact_share > 0 needs exact_scores (layers, batch, kv_heads, prefill tokens), e.g. "
                             "faedkv.kvzip.kvzip_prefill's, and exact_scores need exact_share > 0")
        if exact_share and compression_ratio == 0:
            raise ValueError("exact_share needs compression_ratio > 0 (ratio 0 keeps every token whole)")
        self.compression_ratio = compression_ratio
        self.dim_share = dim_share
        self.sink_tokens = sink_tokens
        self.window = window
        self.window_share = window_share
        self.exact_share = exact_share
        self.exact_masks = None       # (layers, batch, kv_heads, N) bool: the hybrid's whole tokens
        if exact_scores is not None:
            if exact_scores.dim() != 4:
                raise ValueError(f"exact_scores must be (layers, batch, kv_heads, tokens), got shape "
                                 f"{tuple(exact_scores.shape)}")
            kept = layout(exact_scores.shape[-1], compression_ratio, sink_tokens, window, exact_share, window_share)
            self.exact_masks = exact_token_masks(exact_scores, kept, exact_pool)
        super().__init__(layers=[])

    def update(self, key_states, value_states, layer_idx: int, cache_kwargs=None):
        while len(self.layers) <= layer_idx:
            index = len(self.layers)
            self.layers.append(ExactLayer(index) if self.compression_ratio == 0 else
                               DimsplitLayer(index, self.compression_ratio, self.dim_share,
                                             self.sink_tokens, self.window, self.exact_share,
                                             self.layer_mask(index), self.window_share))
        return self.layers[layer_idx].update(key_states, value_states, cache_kwargs)

    def layer_mask(self, index: int) -> torch.Tensor | None:
        if self.exact_masks is None:
            return None
        if index >= self.exact_masks.shape[0]:
            raise ValueError(f"DimsplitCache's exact_scores cover {self.exact_masks.shape[0]} layers, but the "
                             f"model has a layer {index}: score every layer of this model")
        return self.exact_masks[index]

    def prefill_from(self, model, prefilled: Cache) -> None:
        """Take `prefilled` (a cache a call of `model` filled with the prompt, such as
        `faedkv.kvzip.kvzip_prefill`'s) as this empty cache's prefill, stored as `model` running
        on this cache would store it, without running the model again. The model (sdpa) is
        switched to faedkv's attention, which reads the store from the next call on."""
        from faedkv.attention import use_faedkv_attention

        if self.layers:
            raise ValueError("prefill_from needs an empty DimsplitCache (it holds a prefill): use a new one")
        if getattr(model.config, "_attn_implementation", None) not in ATTENTIONS:
            raise ValueError("DimsplitCache needs its store read by faedkv's attention: load the model with "
                             "attn_implementation='sdpa'")
        for index, layer in enumerate(prefilled.layers):
            if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
                raise ValueError(f"prefill_from needs a filled cache of keys and values; layer {index} holds none")
            self.update(layer.keys, layer.values, index)
        use_faedkv_attention(model.config)
        for layer in self.layers:
            layer.served_by(model.config)

    def stored_lengths(self) -> list[int]:
        """Exact rows stored per layer (sink + window + decoded tokens)."""
        return [layer.stored_length() for layer in self.layers]

    def equivalent_rows(self) -> list[float]:
        """Per layer: exact rows + the middle's stored numbers / (2 head_dim)."""
        return [layer.equivalent_rows() if isinstance(layer, DimsplitLayer) else float(layer.stored_length())
                for layer in self.layers]

    def memory_bytes(self) -> int:
        """Bytes of every tensor held between forward calls, all layers."""
        return sum(layer.memory_bytes() for layer in self.layers)
