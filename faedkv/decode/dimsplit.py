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
from faedkv.budget import layout
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


def dimsplit_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       middle: DimsplitMiddle, scaling: float) -> torch.Tensor:
    """softmax over [middle | exact rows] of scaling * q . k, times v, without the middle's rows.

    query (batch, heads, q, d); keys, values (batch, kv_heads, R, d): the exact rows, the call's
    q new tokens last (causal among themselves; every other row is in their past); middle: the
    stored split. Float32 inside. -> (batch, q, heads, d) in query's dtype (as transformers'
    attention functions return). Per query head: O(K d + N d_e + N log N) for the middle."""
    batch, heads, length, dim = query.shape
    kv_heads, rows = keys.shape[1], keys.shape[-2]
    f32 = torch.float32
    grouped = query.to(f32).reshape(batch, kv_heads, heads // kv_heads * length, dim)
    exact_logits = grouped @ keys.to(f32).transpose(-1, -2)
    if length > 1:
        newest = torch.arange(grouped.shape[-2], device=query.device) % length + (rows - length)
        hidden = torch.arange(rows, device=query.device) > newest.unsqueeze(-1)
        exact_logits = exact_logits.masked_fill(hidden, float("-inf"))
    tokens, bins, split = middle.tokens, middle.bins, middle.exact_dims
    order = middle.order[0].unsqueeze(-2).expand(grouped.shape)
    permuted = grouped.gather(-1, order)
    mid_logits = permuted[..., :split] @ middle.exact[0].to(f32).transpose(-1, -2)
    z = permuted[..., split:] @ middle.coefficients[0].to(f32).transpose(-1, -2)     # (..., 2K - 1)
    imag = torch.cat([torch.zeros_like(z[..., :1]), z[..., bins:]], dim=-1)
    mid_logits = mid_logits + torch.fft.irfft(torch.complex(z[..., :bins].contiguous(), imag), n=tokens, dim=-1)
    weights = torch.softmax(torch.cat([mid_logits, exact_logits], dim=-1) * scaling, dim=-1)
    mid_weights, exact_weights = weights[..., :tokens], weights[..., tokens:]
    out = exact_weights @ values.to(f32)
    spectrum = torch.fft.rfft(mid_weights, dim=-1)[..., :bins] * bin_weights(tokens, bins, query.device)
    folded = torch.cat([spectrum.real, spectrum.imag[..., 1:]], dim=-1) / tokens        # (..., 2K - 1)
    mid_out = torch.cat([mid_weights @ middle.exact[1].to(f32),
                         folded @ middle.coefficients[1].to(f32)], dim=-1)
    out = out.scatter_add(-1, middle.order[1].unsqueeze(-2).expand(out.shape), mid_out)
    return out.reshape(batch, heads, length, dim).transpose(1, 2).to(query.dtype)


class DimsplitLayer(FAEDKVLayerBase):
    """One layer's sink + window + tail rows (exact, `exact_keys`/`exact_values`, growing) and
    the prefill's middle as a `DimsplitMiddle`."""

    def __init__(self, layer_idx: int, compression_ratio: float, dim_share: float, sink_tokens: int,
                 window: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.compression_ratio = compression_ratio
        self.dim_share = dim_share
        self.asked = (sink_tokens, window)
        self.sink_tokens, self.window = sink_tokens, window   # as used (a short prefill shrinks them)
        self.seen = 0
        self.middle = None            # DimsplitMiddle once prefilled
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
        return dimsplit_attention(query, key, value, self.middle, scaling), None

    # --- CacheLayerMixin ------------------------------------------------------------------
    def update(self, key_states, value_states, cache_kwargs=None):
        self.seen += key_states.shape[-2]
        if self.middle is None:
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
        kept = layout(tokens, self.compression_ratio, *self.asked)
        if kept.slots == 0:
            raise ValueError(f"DimsplitCache cannot compress a {tokens}-token prefill at compression_ratio="
                             f"{self.compression_ratio} (it keeps all {kept.rows} rows); prefill more tokens")
        s, w = kept.sink, kept.window
        self.sink_tokens, self.window = s, w
        self.middle = DimsplitMiddle.compress(keys[:, :, s:tokens - w], values[:, :, s:tokens - w],
                                              kept.slots, self.dim_share)
        self.exact_keys = torch.cat([keys[:, :, :s], keys[:, :, tokens - w:]], dim=-2)
        self.exact_values = torch.cat([values[:, :, :s], values[:, :, tokens - w:]], dim=-2)

    def get_mask_sizes(self, cache_position: torch.Tensor | int) -> tuple[int, int]:
        # the mask spans every position (the attention checks it for padding, then reads the
        # store, which has no column order); sdpa's mask builder returns None when unpadded
        query = cache_position if isinstance(cache_position, int) else cache_position.shape[0]
        return self.seen + query, 0

    def persistent_tensors(self) -> list[torch.Tensor]:
        parts = [self.exact_keys, self.exact_values] + ([] if self.middle is None else self.middle.tensors())
        return [t for t in parts if t is not None]

    def stored_length(self) -> int:
        """Exact rows stored: S + W + the tokens decoded so far."""
        return 0 if self.exact_keys is None else self.exact_keys.shape[-2]

    def equivalent_rows(self) -> float:
        """Exact rows + the middle's stored numbers / (2 d) (keys and values averaged), as the
        press's `equivalent_rows` (plus the tail); indices not counted."""
        if self.middle is None:
            return float(self.stored_length())
        dim = self.exact_keys.shape[-1]
        per_row = 2 * dim * self.exact_keys.shape[0] * self.exact_keys.shape[1]
        return self.stored_length() + self.middle.numbers() / per_row

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.compression_ratio, self.dim_share, *self.asked)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("DimsplitCache does not support beam search; use greedy or sampling")

    def crop(self, max_length: int) -> None:
        raise ValueError("DimsplitCache cannot be cropped (assisted / speculative decoding is not supported)")


class DimsplitCache(Cache):
    """The dimension split stored physically, for `model.generate` on an sdpa model:

        cache = DimsplitCache(compression_ratio=0.5, dim_share=0.5)
        model.generate(input_ids, past_key_values=cache, max_new_tokens=200)

    The prefill is split as `FAEDKVPress(variant="dimsplit", dim_share=..., sink_tokens=...,
    window=...)` splits it (post-RoPE keys), decode tokens append exactly, and attention reads
    the split without rebuilding the middle's rows (module docstring). compression_ratio 0 keeps
    everything (a plain growing cache). A prefill too short for sink + window + 1 row raises.
    `memory_bytes()`: every tensor held between calls (exact rows, exact dims' values,
    coefficients, dim indices); `stored_lengths()`: exact rows per layer; `equivalent_rows()`:
    those plus the middle's numbers in rows of d.
    """

    def __init__(self, compression_ratio: float = 0.5, dim_share: float = 0.5, sink_tokens: int = 4,
                 window: int = 64):
        if not 0 <= compression_ratio < 1:
            raise ValueError(f"compression_ratio must be in [0, 1), got {compression_ratio}")
        if not 0 <= dim_share < 1:
            raise ValueError(f"dim_share must be in [0, 1) (the share of the middle budget spent on exact "
                             f"dims), got {dim_share!r}")
        if sink_tokens < 0 or window < 0:
            raise ValueError("sink_tokens and window must be >= 0")
        self.compression_ratio = compression_ratio
        self.dim_share = dim_share
        self.sink_tokens = sink_tokens
        self.window = window
        super().__init__(layers=[])

    def update(self, key_states, value_states, layer_idx: int, cache_kwargs=None):
        while len(self.layers) <= layer_idx:
            index = len(self.layers)
            self.layers.append(ExactLayer(index) if self.compression_ratio == 0 else
                               DimsplitLayer(index, self.compression_ratio, self.dim_share,
                                             self.sink_tokens, self.window))
        return self.layers[layer_idx].update(key_states, value_states, cache_kwargs)

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
