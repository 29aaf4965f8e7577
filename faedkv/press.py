"""FAEDKVPress: kvpress press that replaces the middle of each layer's prefill cache by spectral slots.

Layout per layer and KV head after compression (faedkv.budget)::

    [ sink: S tokens ][ exact: E scored middle tokens ][ M slots ][ recent: last W tokens ]

Budget: kvpress's, S + E + M + W = max(1, int(T * (1 - ratio))) rows for a prefill of T tokens;
when S + W + 1 does not fit, the window shrinks first, then the sink (recorded in last_stats).
Slot m is the mean of its class of middle tokens (band-limited by the plan) and attention adds
log(tokens in the class) to its logit (the mass correction, faedkv.attention): with every bin
kept, attention then equals attention over the cache in which each middle token is replaced by
its class mean.

variant="dimsplit" (FourierAttention's dimension split) has no slots: within the same budget it
keeps some head dims exact and the others as their lowest rfft bins, reconstructed at every
middle token (T rows, equivalent rows in last_stats; `compress_dimsplit`). With exact_share it
first keeps a scorer's top middle tokens whole and splits the rest.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from kvpress.presses.base_press import BasePress
from kvpress.presses.scorer_press import ScorerPress
from torch import nn

from faedkv import fused
from faedkv.attention import BIAS_ATTR, log_mass, record_fitted_bias, record_slot_bias, use_faedkv_attention
from faedkv.fit import class_members, fit_slots, probe_queries
from faedkv.budget import EXACT_POOLS, Layout, exact_token_masks, layout, split_exact
from faedkv.plans import FrequencyPlan
from faedkv.rope import rope_cos_sin, rope_parameters, rotate, token_positions, unrotate
from faedkv.variants import (DIMSPLIT, SLOT_NORMALIZATIONS, VARIANTS, check_normalization, compress,
                             compress_dimsplit, compress_dimsplit_rest, expand, plan_keep, slot_mass, slot_positions, split_numbers,
                             take_dims)

KEY_SPACES = ("post_rope", "pre_rope")
# the slot variants (faedkv.variants.VARIANTS) and the dimension split, which keeps every row
PRESS_VARIANTS = (*VARIANTS, DIMSPLIT)
DIM_SHARE = 0.5
SLOT_FITS = ("mean", "probes")
ERROR_KEYS = ("key_error", "value_error", "reconstruction_error")
# what a layer stored, in rows of head_dim numbers (keys and values averaged): the rows for the
# slot variants; for dimsplit (no slots, T rows kept) S + W + E + ((N - E) d_e + M (d - d_e)) / d, with
# exact_dims = [d_e keys, d_e values], coefficients = [M keys, M values] and the chosen dims
# (batch, kv_heads, d_e) as lists
SPLIT_KEYS = ("equivalent_rows", "exact_dims", "coefficients", "key_exact_dims", "value_exact_dims")
STAT_KEYS = ("tokens", "cache_len", "sink_tokens", "window", "slots", "exact", "middle", *ERROR_KEYS,
             *SPLIT_KEYS)
# kvpress scorers a hybrid may use to pick its exact middle tokens (query-agnostic ones first)
SCORER_PRESSES = {"expected_attention": "ExpectedAttentionPress", "knorm": "KnormPress",
                  "keydiff": "KeyDiffPress", "snapkv": "SnapKVPress", "tova": "TOVAPress"}
# ... and KVzip's reconstruction scores (faedkv.kvzip), computed after the prefill
EXACT_SCORERS = (*SCORER_PRESSES, "kvzip")


# FAEDKV ranked by KVzip compresses after the prefill, in its own __call__; a wrapper's hooks see no scores
KVZIP_OUTSIDE = ("FAEDKV ranked by KVzip (the default) scores and compresses after the prefill, inside its own "
                 "`with press(model):`, so it cannot run inside another press's hooks (PerLayerCompressionPress, "
                 "ComposedPress, ...): use it on its own, or pick an exact_scorer the hooks can run (keydiff, say, "
                 "with exact_pool='layer'), or variant='iwdft'")


def check_fraction(name: str, value, meaning: str) -> None:
    """A number in [0, 1) (bools refused), else ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1) ({meaning}), got {value!r}")


def fused_compress(x: torch.Tensor, start: int, end: int, num_slots: int, normalization: str) -> torch.Tensor:
    """[sink | slots | window] with the slots folded by faedkv.fused straight into place."""
    batch, heads, tokens, dim = x.shape
    out = x.new_empty(batch, heads, start + num_slots + tokens - end, dim)
    out[:, :, :start] = x[:, :, :start]
    out[:, :, start + num_slots:] = x[:, :, end:]
    fused.fold_into(out[:, :, start:start + num_slots], x[:, :, start:end], num_slots,
                    mean=normalization == "mean")
    return out


def head_mean(values) -> float | int:
    """The mean over heads of a per-head count (an int when every head has the same)."""
    flat = torch.as_tensor(values, dtype=torch.float64).flatten()
    return int(flat[0]) if bool((flat == flat[0]).all()) else round(float(flat.mean()), 3)


def split_hybrid(mid_keys: torch.Tensor, mid_values: torch.Tensor, exact: torch.Tensor, rows: int,
                 dim_share: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A dimsplit hybrid's middle: the `exact` tokens (batch, kv_heads, N) whole, each head's
    others split within `rows` rows (faedkv.variants.compress_dimsplit_rest); and what it stored,
    averaged over heads: exact tokens, exact dims, numbers and M, for keys and values."""
    new_keys, key_dims, key_numbers, key_m = compress_dimsplit_rest(mid_keys, exact, rows, dim_share)
    new_values, value_dims, value_numbers, value_m = compress_dimsplit_rest(mid_values, exact, rows, dim_share)
    widths = [[[len(h) for h in b] for b in d] for d in (key_dims, value_dims)]
    return new_keys, new_values, {
        "exact_tokens": float(exact.sum(-1).double().mean()), "dims": [key_dims, value_dims],
        "exact_dims": [head_mean(w) for w in widths],
        "numbers": [float(n.double().mean()) for n in (key_numbers, value_numbers)],
        "coefficients": [head_mean(m) for m in (key_m, value_m)]}


# FAEDKVPress()'s hybrid knobs (issue 15's search winner on Qwen2.5-Coder-1.5B, docs/RESULTS.md): the dimension
# split behind KVzip's ranking over every layer and head, 90% of the middle's budget as whole tokens, a recent
# window of half the kept rows. The slot variants keep their own defaults: no exact tokens, a fixed window.
SHIPPED_HYBRID = {"exact_share": 0.9, "exact_scorer": "kvzip", "exact_pool": "global", "window_share": 0.5}
SLOT_HYBRID = {"exact_share": 0.0, "exact_scorer": "expected_attention", "exact_pool": "head", "window_share": 0.0}


@dataclass
class FAEDKVPress(BasePress):
    """Frequency-domain compression of the middle of the prefill cache (FAEDKV and comparators).

    The default, FAEDKVPress(compression_ratio=r), is the search's winner (SHIPPED_HYBRID): the
    dimension split, KVzip's top tokens over the whole model kept whole (90% of the middle's
    budget), a recent window of half the kept rows. KVzip's scoring needs the model's tokenizer
    at model.config.name_or_path and costs extra passes after the prefill (faedkv.kvzip). A
    hybrid knob left None takes the variant's default: SHIPPED_HYBRID for dimsplit (exact_pool
    "global" only with the kvzip scorer, else "head"), SLOT_HYBRID for the slot variants.

    compression_ratio: fraction of the cache removed (kvpress convention); 0 is a no-op.
    variant: "dimsplit" (default) or "iwdft" | "resample" | "dct-iterative" (faedkv.variants); "dimsplit"
        (FourierAttention-style dimension split, arXiv 2506.11886: in the middle, the head dims
        whose energy lies most outside the kept low band stay exact for every token, the others
        keep only their lowest rfft bins along the tokens and are reconstructed at every
        position, in the bytes of kvpress's budget; every token keeps a row, so the cache has T
        rows and `last_stats` records the equivalent rows; no plan, no mass bias; with
        exact_share, the scorer's exact tokens stay whole and the other N - E are split).
    dim_share: dimsplit only: the share of the split's budget (R rows after sink, window and
        exact tokens) spent on exact dims, d_e = floor(dim_share R d / (N - E)) (even for pre-RoPE keys: rotate-half
        pairs together); the rest holds M = floor((R d - N d_e) / (d - d_e)) real low-pass
        coefficients per compressed dim. 0: a pure low-pass reconstruction.
    sink_tokens, window: exact tokens kept at the start and at the end, as asked; a budget too
        small for them and one slot shrinks the window, then the sink (dct-iterative also uses
        the window as its re-compression step).
    window_share: a recent window that grows with the budget: the window asked for is
        max(window, floor(window_share x kept rows)) (faedkv.budget.asked_window); 0: `window`
        tokens at every budget; None: 0.5 for dimsplit, 0 otherwise. Not with dct-iterative (its
        window is its re-compression step).
    plan: FrequencyPlan choosing which of the M bins each layer keeps; None keeps every bin.
    key_space: "post_rope" compresses keys as cached; "pre_rope" undoes RoPE at each token's
        position, compresses, and re-rotates each slot at its representative position.
    mass_correction: add log(tokens a slot stands for) to its attention logit (faedkv.attention;
        switches an sdpa model to the "faedkv_sdpa" attention, identical when no bias is set).
    slot_normalization: "mean" (a slot is the mean of its tokens) or "sum" (iwdft only: the old
        (M/t) x class sums, which breaks real models; kept to show why).
    exact_share: hybrid budget: this fraction of the rows left after sink and window keeps exact
        middle tokens chosen by `exact_scorer` (a kvpress scorer: expected_attention, knorm,
        keydiff, snapkv, tova; or kvzip: KVzip's context-reconstruction scores, 2-3 extra
        prefill passes after the prefill); the slots summarise every other middle token, so what
        eviction would throw away is averaged in instead of lost (with dimsplit, the split stores
        every other middle token). 0: no exact middle tokens. None: 0.9 and kvzip for dimsplit,
        0 and expected_attention otherwise.
    exact_pool: where a hybrid's exact tokens compete: "head" (the top E of each KV head);
        "layer" (the top E x kv_heads of the layer's heads together, as KVzip's layerwise
        budget); dimsplit only: "global" (the top E x kv_heads x layers of every layer and head,
        as KVzip's default budget; exact_scorer='kvzip', whose scores come for all layers at
        once). Every head's split keeps R rows' worth, so a layer (or, for "global", the model)
        stores kvpress's budget; heads with more exact tokens leave fewer tokens to split. With
        slots ("layer"), every head keeps E + M rows: head h E_h exact tokens (at most E + M - 1)
        and E + M - E_h slots (`compress_pooled`). None: "global" for dimsplit ranked by kvzip,
        "head" otherwise.
    slot_fit: "mean" (slots are class means with log-count mass) or "probes" (attention-matched:
        each slot's logit bias and value refit so the prompt's last `fit_probes` queries give it
        the mass and weighted value its tokens had; faedkv.fit; iwdft, post-RoPE keys).

    After each prefill, `last_stats[layer]` holds the keys of STAT_KEYS: "tokens", "cache_len",
    "sink_tokens", "window", "slots", "exact", "middle" (the layout actually used) and
    "key_error", "value_error", "reconstruction_error": relative Frobenius errors of the
    summarised middle against the closed-form way back from slots to tokens (each token takes
    its class mean for iwdft; band-limited interpolation for resample / dct-iterative), None
    unless record_errors (and a middle was compressed).
    fused: on CUDA with Triton, compute the commonest case (iwdft, no plan, post-RoPE, no hybrid,
    no errors recorded) with one kernel per tensor (faedkv.fused); False takes the torch path.
    """

    compression_ratio: float = 0.0
    variant: str = DIMSPLIT
    sink_tokens: int = 4
    window: int = 64
    window_share: float | None = None
    plan: FrequencyPlan | None = None
    key_space: str = "post_rope"
    mass_correction: bool = True
    slot_normalization: str = "mean"
    exact_share: float | None = None
    exact_scorer: str | None = None
    exact_pool: str | None = None
    slot_fit: str = "mean"
    fit_probes: int = 64
    dim_share: float = DIM_SHARE
    record_errors: bool = True
    fused: bool = True
    last_stats: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        check_fraction("compression_ratio", self.compression_ratio, "fraction removed")
        if self.variant not in PRESS_VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; use one of {', '.join(PRESS_VARIANTS)}")
        self.fill_hybrid_defaults()
        check_fraction("dim_share", self.dim_share, "the share of the middle budget spent on exact dims")
        if self.variant != DIMSPLIT and self.dim_share != DIM_SHARE:
            raise ValueError(f"dim_share is the dimension split's knob; variant {self.variant!r} "
                             "has none: use variant='dimsplit' or leave dim_share out")
        if self.variant == DIMSPLIT and self.plan is not None:
            raise ValueError("a FrequencyPlan chooses slot bins; variant='dimsplit' keeps the low band "
                             "the budget sizes: use plan=None with dimsplit")
        if self.key_space not in KEY_SPACES:
            raise ValueError(f"key_space must be 'post_rope' or 'pre_rope', got {self.key_space!r}")
        for name in ("sink_tokens", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        check_fraction("window_share", self.window_share, "the kept rows' share in the recent window")
        if self.window_share and self.variant == "dct-iterative":
            raise ValueError("dct-iterative re-compresses every `window` tokens, so its window cannot grow "
                             "with the budget: use window_share=0 with dct-iterative")
        if self.plan is not None and not isinstance(self.plan, FrequencyPlan):
            raise ValueError("plan must be a faedkv.FrequencyPlan (FrequencyPlan.from_json(...)) or None")
        if self.slot_normalization not in SLOT_NORMALIZATIONS:
            raise ValueError(f"slot_normalization must be one of {', '.join(SLOT_NORMALIZATIONS)}, got "
                             f"{self.slot_normalization!r}")
        check_normalization(self.variant, self.slot_normalization)
        check_fraction("exact_share", self.exact_share, "the budget share of exact middle tokens")
        if self.exact_scorer not in EXACT_SCORERS:
            raise ValueError(f"unknown exact_scorer {self.exact_scorer!r}; use one of {', '.join(EXACT_SCORERS)}")
        if self.exact_share and self.exact_scorer == "kvzip" and self.slot_fit == "probes":
            raise ValueError("slot_fit='probes' needs the prefill's queries, which KVzip's scoring "
                             "(after the prefill) does not keep: use slot_fit='mean' with exact_scorer='kvzip'")
        if self.exact_share and (self.key_space == "pre_rope" or self.variant == "dct-iterative"):
            raise ValueError("a hybrid (exact_share > 0) keeps post-RoPE exact tokens and summarises "
                             "the rest with iwdft, resample or dimsplit: use key_space='post_rope' and one of those")
        if self.exact_pool not in EXACT_POOLS:
            raise ValueError(f"exact_pool must be one of {', '.join(EXACT_POOLS)}, got {self.exact_pool!r}")
        if self.exact_pool != "head" and not self.exact_share:
            raise ValueError(f"exact_pool={self.exact_pool!r} says where exact tokens compete: it needs "
                             "exact_share > 0")
        if self.exact_pool == "global" and self.variant != DIMSPLIT:
            raise ValueError("exact_pool='global' moves exact tokens between layers, which only the dimension "
                             "split can store (every token keeps a row, bytes are counted over the model): use "
                             "variant='dimsplit', or exact_pool='layer' (slots: each head keeps E_h exact tokens "
                             "and R - E_h slots)")
        if self.exact_pool == "layer" and self.variant != DIMSPLIT and (self.plan is not None
                                                                         or self.slot_fit != "mean"):
            raise ValueError("exact_pool='layer' with slots gives each head its own number of slots, which a "
                             "plan's bins and slot_fit='probes' do not cover: use plan=None and slot_fit='mean'")
        if self.exact_pool == "global" and self.exact_scorer != "kvzip":
            raise ValueError("exact_pool='global' ranks every layer's tokens together, so it needs every "
                             "layer's scores before the first is compressed: use exact_scorer='kvzip' "
                             "(or exact_pool='layer')")
        if self.slot_fit not in SLOT_FITS:
            raise ValueError(f"slot_fit must be one of {', '.join(SLOT_FITS)}, got {self.slot_fit!r}")
        if self.slot_fit == "probes" and (self.variant != "iwdft" or self.key_space != "post_rope"
                                          or self.slot_normalization != "mean"):
            raise ValueError("slot_fit='probes' refits iwdft's class means over post-RoPE keys: use "
                             "variant='iwdft', key_space='post_rope', slot_normalization='mean'")
        if isinstance(self.fit_probes, bool) or not isinstance(self.fit_probes, int) or self.fit_probes < 1:
            raise ValueError(f"fit_probes must be an integer >= 1, got {self.fit_probes!r}")
        self.scorer = None
        self.layer_scores, self.global_masks = {}, None
        if self.exact_share and self.exact_scorer == "kvzip":
            from faedkv.kvzip import KVzipScores

            self.scorer = KVzipScores(on_scores=self.compress_scored)
        elif self.exact_share:
            import kvpress

            # the scorer's own ratio is unused: we call score() and pick the top E ourselves
            self.scorer = getattr(kvpress, SCORER_PRESSES[self.exact_scorer])()

    def fill_hybrid_defaults(self) -> None:
        """The hybrid knobs left None take the variant's defaults (SHIPPED_HYBRID, SLOT_HYBRID)."""
        defaults = SHIPPED_HYBRID if self.variant == DIMSPLIT else SLOT_HYBRID
        for name in ("exact_share", "exact_scorer", "window_share"):
            if getattr(self, name) is None:
                setattr(self, name, defaults[name])
        if self.exact_pool is None:
            shipped = self.variant == DIMSPLIT and self.exact_share and self.exact_scorer == "kvzip"
            self.exact_pool = SHIPPED_HYBRID["exact_pool"] if shipped else "head"

    def post_init_from_model(self, model):
        self.last_stats = {}
        layers = model.config.get_text_config().num_hidden_layers
        if self.plan is not None and self.plan.num_layers != layers:
            raise ValueError(f"plan {self.plan.name!r} has {self.plan.num_layers} layers but the "
                             f"model has {layers}; build the plan for this model")
        if self.mass_correction and self.variant != DIMSPLIT:   # dimsplit: one row per token, mass 1
            use_faedkv_attention(model.config)
        if self.scorer is not None:
            self.scorer.post_init_from_model(model)

    @contextmanager
    def __call__(self, model):
        """kvpress's hooks compress each layer during the prefill; with KVzip's scores the
        prefill runs whole, then KVzip's passes score it and `compress_scored` compresses."""
        if not (self.exact_share and self.exact_scorer == "kvzip" and self.compression_ratio):
            with super().__call__(model):
                yield
            return
        self.post_init_from_model(model)
        self.scorer.compression_ratio = self.compression_ratio
        try:
            with self.scorer(model):
                yield
        finally:
            self.layer_scores, self.global_masks = {}, None

    def compress_scored(self, model, cache, scores: torch.Tensor) -> None:
        """Compress every layer of `cache` in place; scores (layers, 1, kv_heads, T) pick the
        exact tokens (exact_mask)."""
        from kvpress.utils import extract_keys_and_values
        from transformers import QuantizedCache

        if self.exact_pool == "global":
            self.global_masks = exact_token_masks(scores, self.layout(scores.shape[-1]), "global")
        for decoder_layer in model.model.layers:
            module = decoder_layer.self_attn
            layer = module.layer_idx
            keys, values = extract_keys_and_values(cache, layer)
            self.layer_scores[layer] = scores[layer]
            keys, values = self.compress(module, None, keys, values, None, {})
            cache_layer = cache.layers[layer]
            if isinstance(cache, QuantizedCache):  # as kvpress's BasePress.forward_hook writes back
                cache_layer._quantized_keys = cache_layer._quantize(keys, axis=cache_layer.axis_key)
                cache_layer._quantized_values = cache_layer._quantize(values, axis=cache_layer.axis_value)
                cache_layer.keys = torch.zeros(0, dtype=keys.dtype, device=keys.device)
                cache_layer.values = torch.zeros(0, dtype=keys.dtype, device=keys.device)
                cache_layer.cumulative_length = keys.shape[2]
            else:
                cache_layer.keys, cache_layer.values = keys, values

    @property
    def step(self) -> int:
        return max(1, self.window)

    def layout(self, num_tokens: int, compression_ratio: float | None = None) -> Layout:
        """How a prefill of num_tokens is kept at compression_ratio (default: the press's);
        kvpress's budget, faedkv.budget.layout."""
        ratio = self.compression_ratio if compression_ratio is None else compression_ratio
        return layout(num_tokens, ratio, self.sink_tokens, self.window, self.exact_share, self.window_share)

    def compress(self, module: nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, attentions: torch.Tensor, kwargs: dict):
        """keys, values (batch, kv_heads, T, head_dim) -> (batch, kv_heads, S + E + M + W, head_dim)."""
        return self.compress_at(self.compression_ratio, module, hidden_states, keys, values, attentions, kwargs)

    def compress_at(self, compression_ratio: float, module: nn.Module, hidden_states: torch.Tensor,
                    keys: torch.Tensor, values: torch.Tensor, attentions: torch.Tensor, kwargs: dict):
        """`compress` at a given ratio (a per-layer ratio of PerLayerCompressionPress)."""
        layer, num_tokens = module.layer_idx, keys.shape[2]
        kept = self.layout(num_tokens, compression_ratio)
        stats = {**kept.as_stats(), **dict.fromkeys(ERROR_KEYS), **dict.fromkeys(SPLIT_KEYS)}
        stats["equivalent_rows"] = float(kept.rows)
        self.last_stats[layer] = stats
        if kept.slots == 0:
            return keys, values
        if self.variant == DIMSPLIT:
            return self.compress_dimsplit(module, hidden_states, keys, values, attentions, kwargs, kept, stats)
        start, end = kept.sink, num_tokens - kept.window
        if kept.exact == 0 and self.fusable(keys, values):
            keys = fused_compress(keys, start, end, kept.slots, self.slot_normalization)
            values = fused_compress(values, start, end, kept.slots, self.slot_normalization)
            self.record_mass(module, start, kept)
            return keys, values
        if kept.exact and self.exact_pool == "layer":
            return self.compress_pooled(module, hidden_states, keys, values, attentions, kwargs, kept, stats)
        # Views: the compressors read bf16 directly and accumulate in float32.
        mid_keys, mid_values = keys[:, :, start:end], values[:, :, start:end]
        exact_keys = exact_values = keys[:, :, :0]
        if kept.exact:
            is_exact = self.exact_mask(module, hidden_states, keys, values, attentions, kwargs, kept)
            mid_keys, exact_keys = split_exact(mid_keys, is_exact)
            mid_values, exact_values = split_exact(mid_values, is_exact)
        if self.key_space == "pre_rope":
            inv_freq, scaling = rope_parameters(module)
            positions = token_positions(kwargs, num_tokens, keys.device)[start:end]
            cos, sin = rope_cos_sin(positions, inv_freq, scaling)
            mid_keys = unrotate(mid_keys.float(), cos, sin, scaling)
        heads, norm = keys.shape[1], self.slot_normalization
        key_slots = compress(self.variant, mid_keys, kept.slots, plan_keep(self.plan, layer, "key", heads),
                             self.step, norm)
        value_slots = compress(self.variant, mid_values, kept.slots,
                               plan_keep(self.plan, layer, "value", heads), self.step, norm)
        if self.record_errors:
            stats.update(self.errors(mid_keys, mid_values, key_slots, value_slots))
        if self.key_space == "pre_rope":
            represent = slot_positions(self.variant, kept.summarised, kept.slots, self.step)
            represent = represent.to(keys.device) + positions[0].double()
            key_slots = rotate(key_slots, *rope_cos_sin(represent, inv_freq, scaling))
        if self.slot_fit == "probes":
            queries = probe_queries(module, hidden_states, kwargs["position_embeddings"], self.fit_probes)
            members = class_members(kept.summarised, kept.slots, keys.device)
            bias, value_slots = fit_slots(queries, module.scaling, mid_keys, mid_values, key_slots, members)
            record_fitted_bias(module, start + kept.exact, bias)
        else:
            self.record_mass(module, start + kept.exact, kept)
        keys = torch.cat([keys[:, :, :start], exact_keys, key_slots.to(keys.dtype), keys[:, :, end:]], dim=2)
        values = torch.cat([values[:, :, :start], exact_values, value_slots.to(values.dtype),
                            values[:, :, end:]], dim=2)
        return keys, values

    def compress_pooled(self, module, hidden_states, keys, values, attentions, kwargs, kept: Layout,
                        stats: dict):
        """A slot hybrid whose exact tokens compete across the layer's heads (exact_pool "layer"):
        every head keeps R = E + M rows, head h E_h whole tokens (the layer's top E x kv_heads,
        at most R - 1 in one head) and R - E_h slots over its other N - E_h tokens, each slot's
        logit + log of its token count (a per-head column bias, as attention-matched slots use)."""
        start, end = kept.sink, keys.shape[2] - kept.window
        rows = kept.exact + kept.slots
        is_exact = self.exact_mask(module, hidden_states, keys, values, attentions, kwargs, kept)
        batch, heads, _, dim = keys.shape
        out_keys, out_values = keys.new_empty(batch, heads, rows, dim), values.new_empty(batch, heads, rows, dim)
        bias = torch.zeros(batch, heads, rows, dtype=torch.float32, device=keys.device)
        for b in range(batch):
            for h in range(heads):
                chosen = is_exact[b, h]
                count = int(chosen.sum())
                for x, out in ((keys, out_keys), (values, out_values)):
                    middle = x[b, h, start:end]
                    out[b, h, :count] = middle[chosen]
                    out[b, h, count:] = compress(self.variant, middle[~chosen], rows - count, None, self.step,
                                                 self.slot_normalization).to(x.dtype)
                if self.mass_correction:
                    bias[b, h, count:] = log_mass(slot_mass(self.variant, end - start - count, rows - count))
        if self.mass_correction:
            record_fitted_bias(module, start, bias)
        stats["exact"] = head_mean(is_exact.sum(-1))
        keys = torch.cat([keys[:, :, :start], out_keys, keys[:, :, end:]], dim=2)
        values = torch.cat([values[:, :, :start], out_values, values[:, :, end:]], dim=2)
        return keys, values

    def compress_dimsplit(self, module, hidden_states, keys, values, attentions, kwargs, kept: Layout,
                          stats: dict):
        """The dimension split of the middle (faedkv.variants.compress_dimsplit) at kvpress's
        budget: R = kept.slots rows' worth of numbers (B - S - W - E); every token keeps its row.
        A hybrid (kept.exact = E > 0) first keeps the scorer's exact tokens whole (`exact_mask`)
        and splits each head's other middle tokens (in time order, as if adjacent) within R."""
        num_tokens, dim = keys.shape[2], keys.shape[3]
        start, end = kept.sink, num_tokens - kept.window
        middle, rows = end - start, kept.slots
        mid_keys, mid_values = keys[:, :, start:end], values[:, :, start:end]
        if getattr(module, BIAS_ATTR, None) is not None:
            setattr(module, BIAS_ATTR, None)   # rows are tokens (mass 1): no log-count bias
        if kept.exact:
            mask = self.exact_mask(module, hidden_states, keys, values, attentions, kwargs, kept)
            new_keys, new_values, split = split_hybrid(mid_keys, mid_values, mask, rows, self.dim_share)
        else:
            pre_rope = self.key_space == "pre_rope"
            space_keys = mid_keys
            if pre_rope:
                inv_freq, scaling = rope_parameters(module)
                positions = token_positions(kwargs, num_tokens, keys.device)[start:end]
                cos, sin = rope_cos_sin(positions, inv_freq, scaling)
                space_keys = unrotate(mid_keys.float(), cos, sin, scaling)
            new_keys, key_dims, key_numbers = compress_dimsplit(space_keys, rows, self.dim_share, pairs=pre_rope)
            new_values, value_dims, value_numbers = compress_dimsplit(mid_values, rows, self.dim_share)
            if pre_rope:   # back at each token's own position; the exact pairs are the cached ones
                new_keys = rotate(new_keys, cos, sin)
            new_keys = take_dims(new_keys.to(keys.dtype), mid_keys, key_dims)
            new_values = take_dims(new_values.to(values.dtype), mid_values, value_dims)
            split = {"exact_tokens": 0.0, "dims": [key_dims.tolist(), value_dims.tolist()],
                     "exact_dims": [key_dims.shape[-1], value_dims.shape[-1]],
                     "numbers": [split_numbers(middle, d.shape[-1], m, dim)
                                 for d, m in ((key_dims, key_numbers), (value_dims, value_numbers))],
                     "coefficients": [key_numbers, value_numbers]}
        exact = split["exact_tokens"]
        stats.update(cache_len=num_tokens, slots=0, middle=middle, exact=int(exact) if exact.is_integer() else exact,
                     equivalent_rows=kept.sink + kept.window + exact + sum(split["numbers"]) / (2 * dim),
                     exact_dims=split["exact_dims"], coefficients=split["coefficients"],
                     key_exact_dims=split["dims"][0], value_exact_dims=split["dims"][1])
        if self.record_errors:
            stats.update(self.errors(mid_keys.float(), mid_values.float(), new_keys.float(),
                                     new_values.float(), expanded=True))
        keys = torch.cat([keys[:, :, :start], new_keys, keys[:, :, end:]], dim=2)
        values = torch.cat([values[:, :, :start], new_values, values[:, :, end:]], dim=2)
        return keys, values

    def exact_mask(self, module, hidden_states, keys, values, attentions, kwargs, kept: Layout) -> torch.Tensor:
        """(batch, kv_heads, N) bool: the middle tokens a dimsplit hybrid keeps whole, by
        `exact_pool` (faedkv.budget.exact_token_masks); for "global", what was chosen across
        every layer before this one was compressed."""
        if self.exact_pool == "global":
            if self.global_masks is None:
                raise ValueError(KVZIP_OUTSIDE)
            return self.global_masks[module.layer_idx]
        scores = self.token_scores(module, hidden_states, keys, values, attentions, kwargs)
        # slots: a head keeps at least one slot for its other tokens
        cap = None if self.variant == DIMSPLIT else kept.exact + kept.slots - 1
        return exact_token_masks(scores[None], kept, self.exact_pool, cap)[0]

    def record_mass(self, module, slot_start: int, kept: Layout) -> None:
        if self.mass_correction:
            record_slot_bias(module, slot_start, slot_mass(self.variant, kept.summarised, kept.slots))

    def token_scores(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        """(batch, kv_heads, T) scores of the prefill's tokens: KVzip's (computed after the
        prefill) or the kvpress scorer's."""
        if self.exact_scorer == "kvzip":
            if module.layer_idx not in self.layer_scores:
                raise ValueError(KVZIP_OUTSIDE)
            return self.layer_scores[module.layer_idx]
        return self.scorer.score(module, hidden_states, keys, values, attentions, kwargs)

    def fusable(self, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """The fused CUDA kernel computes exactly this press: iwdft, every bin, post-RoPE keys,
        no exact tokens and no error statistics to record (they need the float32 middle)."""
        return (self.fused and self.variant == "iwdft" and self.plan is None and self.key_space == "post_rope"
                and not self.exact_share and self.slot_fit == "mean" and not self.record_errors and fused.can_fuse(keys)
                and fused.can_fuse(values))

    @torch.no_grad()
    def errors(self, mid_keys, mid_values, key_slots, value_slots, expanded: bool = False) -> dict:
        """Relative errors of the middle's way back (`expanded`: the slots are already one row
        per middle token, as dimsplit's)."""
        middle, norm = mid_keys.shape[-2], self.slot_normalization
        if not expanded:
            key_slots = expand(self.variant, key_slots, middle, self.step, norm)
            value_slots = expand(self.variant, value_slots, middle, self.step, norm)
        key_diff = torch.linalg.vector_norm(mid_keys - key_slots)
        value_diff = torch.linalg.vector_norm(mid_values - value_slots)
        key_norm, value_norm = torch.linalg.vector_norm(mid_keys), torch.linalg.vector_norm(mid_values)
        both = torch.sqrt((key_diff ** 2 + value_diff ** 2) / (key_norm ** 2 + value_norm ** 2).clamp(min=1e-30))
        return {"key_error": float(key_diff / key_norm.clamp(min=1e-30)),
                "value_error": float(value_diff / value_norm.clamp(min=1e-30)),
                "reconstruction_error": float(both)}

    def as_scorer(self) -> "FAEDKVScorerPress":
        """This press behind kvpress's ScorerPress interface, for wrappers that demand one."""
        return FAEDKVScorerPress(compression_ratio=self.compression_ratio, press=self)


@dataclass
class FAEDKVScorerPress(ScorerPress):
    """Adapter for kvpress wrappers that require a ScorerPress (PerLayerCompressionPress):
    the wrapper sets `compression_ratio` per layer, the wrapped FAEDKVPress compresses.

        PerLayerCompressionPress(FAEDKVPress(variant="iwdft").as_scorer(), compression_ratios=[...])

    Per-layer ratios give layers different cache lengths; transformers builds its causal mask
    from layer 0, so this adapter switches an sdpa model to "faedkv_sdpa", which re-aligns the
    mask per layer (eager attention would silently mis-align it and is refused).
    """

    compression_ratio: float = 0.0
    press: FAEDKVPress = field(default_factory=lambda: FAEDKVPress(variant="iwdft"))

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.press, FAEDKVPress):
            raise ValueError("FAEDKVScorerPress wraps a FAEDKVPress")
        if self.press.exact_share and self.press.exact_scorer == "kvzip":
            raise ValueError(KVZIP_OUTSIDE)

    @property
    def last_stats(self) -> dict:
        return self.press.last_stats

    def post_init_from_model(self, model):
        self.press.post_init_from_model(model)
        use_faedkv_attention(model.config)

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        raise ValueError("FAEDKV merges the middle tokens into slots, it has no per-token scores; "
                         "use it directly, through PerLayerCompressionPress, or ComposedPress")

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        # PerLayerCompressionPress never calls post_init_from_model, so switch here (idempotent).
        use_faedkv_attention(module.config)
        if module.layer_idx == 0:
            self.press.last_stats = {}
        return self.press.compress_at(self.compression_ratio, module, hidden_states, keys, values,
                                      attentions, kwargs)
