"""FAEDKVPress: kvpress press that replaces the middle of each layer's prefill cache by spectral slots.

Layout per layer and KV head after compression::

    [ sink: first S tokens ][ M slots ][ recent: last W tokens ]

Budget (kvpress convention, ratio = fraction removed): for a prefill of T tokens,
M = round((1 - ratio) * T) - S - W, so the cache holds round((1 - ratio) * T) rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from kvpress.presses.base_press import BasePress
from kvpress.presses.scorer_press import ScorerPress
from torch import nn

from faedkv import fused
from faedkv.attention import record_slot_bias, use_faedkv_attention
from faedkv.iwdft import fold_counts
from faedkv.plans import FrequencyPlan
from faedkv.rope import rope_cos_sin, rope_parameters, rotate, token_positions, unrotate
from faedkv.variants import VARIANTS, compress, expand, plan_keep, slot_positions

KEY_SPACES = ("post_rope", "pre_rope")


def budget_slots(num_tokens: int, compression_ratio: float, sink_tokens: int, window: int) -> int:
    """M = round((1 - ratio) * T) - sink - window; raises ValueError when it is < 1."""
    slots = round((1 - compression_ratio) * num_tokens) - sink_tokens - window
    if slots < 1:
        raise ValueError(
            f"a prefill of {num_tokens} tokens at compression_ratio={compression_ratio} keeps "
            f"{round((1 - compression_ratio) * num_tokens)} rows, not enough for sink_tokens="
            f"{sink_tokens} + window={window} + 1 slot; the minimum context at this ratio is "
            f"{minimum_context(compression_ratio, sink_tokens, window)} tokens (or lower the ratio, "
            "the sink or the window)")
    return slots


def minimum_context(compression_ratio: float, sink_tokens: int, window: int) -> int:
    """Smallest T with round((1 - ratio) * T) >= sink + window + 1."""
    need = sink_tokens + window + 1
    tokens = max(need, math.floor(need / (1 - compression_ratio)) - 1)
    while round((1 - compression_ratio) * tokens) < need:
        tokens += 1
    return tokens


def fused_compress(x: torch.Tensor, start: int, end: int, num_slots: int) -> torch.Tensor:
    """[sink | slots | window] with the slots folded by faedkv.fused straight into place."""
    batch, heads, tokens, dim = x.shape
    out = x.new_empty(batch, heads, start + num_slots + tokens - end, dim)
    out[:, :, :start] = x[:, :, :start]
    out[:, :, start + num_slots:] = x[:, :, end:]
    fused.fold_into(out[:, :, start:start + num_slots], x[:, :, start:end], num_slots)
    return out


def tokens_per_slot(variant: str, num_tokens: int, num_slots: int) -> torch.Tensor:
    """(M,) how many middle tokens each slot stands for (exact counts for iwdft, N/M otherwise)."""
    if variant == "iwdft":
        return fold_counts(num_tokens, num_slots).double()
    return torch.full((num_slots,), num_tokens / num_slots, dtype=torch.float64)


@dataclass
class FAEDKVPress(BasePress):
    """Frequency-domain compression of the middle of the prefill cache (FAEDKV and comparators).

    compression_ratio: fraction of the cache removed (kvpress convention); 0 is a no-op.
    variant: "iwdft" | "resample" | "dct-iterative" (faedkv.variants).
    sink_tokens, window: exact tokens kept at the start and at the end (dct-iterative also uses
        the window as its re-compression step).
    plan: FrequencyPlan choosing which of the M bins each layer keeps; None keeps every bin.
    key_space: "post_rope" compresses keys as cached; "pre_rope" undoes RoPE at each token's
        position, compresses, and re-rotates each slot at its representative position.
    mass_correction: add log(tokens per slot) to the slots' attention logits (faedkv.attention;
        switches an sdpa model to the "faedkv_sdpa" attention, identical when no bias is set).

    Short prompts: with T <= sink + window there is no middle, the cache is left unchanged (the
    ratio applies to the middle only when one exists). With a middle but a budget too small for
    sink + window + 1 slot, compress raises ValueError naming the minimum context length.

    After each prefill, `last_stats[layer]` holds {"tokens", "cache_len", "slots", "middle",
    "key_error", "value_error", "reconstruction_error"}: errors are relative Frobenius errors of
    the middle segment (in the space it was compressed in) against its reconstruction by the
    closed-form way back from slots to tokens (each token takes its slot's value for iwdft;
    band-limited interpolation for resample / dct-iterative), i.e. the pseudo-inverse of the
    map when every bin is kept; "reconstruction_error" is that of keys and values stacked.
    record_errors=False skips the errors (the benchmark times compression alone).
    fused: on CUDA with Triton, compute the commonest case (iwdft, no plan, post-RoPE, no errors
    recorded) with one kernel per tensor (faedkv.fused); False always takes the torch path.
    """

    compression_ratio: float = 0.0
    variant: str = "iwdft"
    sink_tokens: int = 4
    window: int = 64
    plan: FrequencyPlan | None = None
    key_space: str = "post_rope"
    mass_correction: bool = False
    record_errors: bool = True
    fused: bool = True
    last_stats: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.compression_ratio, (int, float)) or not 0 <= self.compression_ratio < 1:
            raise ValueError(f"compression_ratio must be in [0, 1) (fraction removed), got "
                             f"{self.compression_ratio!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; use one of {', '.join(VARIANTS)}")
        if self.key_space not in KEY_SPACES:
            raise ValueError(f"key_space must be 'post_rope' or 'pre_rope', got {self.key_space!r}")
        for name in ("sink_tokens", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.plan is not None and not isinstance(self.plan, FrequencyPlan):
            raise ValueError("plan must be a faedkv.FrequencyPlan (FrequencyPlan.from_json(...)) or None")

    def post_init_from_model(self, model):
        self.last_stats = {}
        layers = model.config.get_text_config().num_hidden_layers
        if self.plan is not None and self.plan.num_layers != layers:
            raise ValueError(f"plan {self.plan.name!r} has {self.plan.num_layers} layers but the "
                             f"model has {layers}; build the plan for this model")
        if self.mass_correction:
            use_faedkv_attention(model.config)

    @property
    def step(self) -> int:
        return max(1, self.window)

    def num_slots(self, num_tokens: int) -> int:
        """Slots kept for a prefill of num_tokens (0 when nothing is compressed)."""
        if self.compression_ratio == 0 or num_tokens <= self.sink_tokens + self.window:
            return 0
        return budget_slots(num_tokens, self.compression_ratio, self.sink_tokens, self.window)

    def compress(self, module: nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, attentions: torch.Tensor, kwargs: dict):
        """keys, values (batch, kv_heads, T, head_dim) -> (batch, kv_heads, S + M + W, head_dim)."""
        layer = module.layer_idx
        num_tokens = keys.shape[2]
        num_slots = self.num_slots(num_tokens)
        if num_slots == 0:
            self.last_stats[layer] = {"tokens": num_tokens, "cache_len": num_tokens, "slots": 0,
                                      "middle": 0, "key_error": 0.0, "value_error": 0.0,
                                      "reconstruction_error": 0.0}
            return keys, values
        start, end = self.sink_tokens, num_tokens - self.window
        middle = end - start
        heads = keys.shape[1]
        if self.fusable(keys, values):
            keys, values = fused_compress(keys, start, end, num_slots), fused_compress(values, start, end, num_slots)
            if self.mass_correction:
                record_slot_bias(module, start, tokens_per_slot(self.variant, middle, num_slots))
            self.last_stats[layer] = {"tokens": num_tokens, "cache_len": keys.shape[2],
                                      "slots": num_slots, "middle": middle}
            return keys, values
        # Views: the compressors read bf16 directly and accumulate in float32.
        mid_keys, mid_values = keys[:, :, start:end], values[:, :, start:end]
        if self.key_space == "pre_rope":
            inv_freq, scaling = rope_parameters(module)
            positions = token_positions(kwargs, num_tokens, keys.device)[start:end]
            cos, sin = rope_cos_sin(positions, inv_freq, scaling)
            mid_keys = unrotate(mid_keys.float(), cos, sin, scaling)
        key_slots = compress(self.variant, mid_keys, num_slots,
                             plan_keep(self.plan, layer, "key", heads), self.step)
        value_slots = compress(self.variant, mid_values, num_slots,
                               plan_keep(self.plan, layer, "value", heads), self.step)
        stats = self.errors(mid_keys, mid_values, key_slots, value_slots) if self.record_errors else {}
        cached_key_slots = key_slots
        if self.key_space == "pre_rope":
            represent = slot_positions(self.variant, middle, num_slots, self.step)
            represent = represent.to(keys.device) + positions[0].double()
            cached_key_slots = rotate(key_slots, *rope_cos_sin(represent, inv_freq, scaling))
        if self.mass_correction:
            record_slot_bias(module, start, tokens_per_slot(self.variant, middle, num_slots))
        keys = torch.cat([keys[:, :, :start], cached_key_slots.to(keys.dtype), keys[:, :, end:]], dim=2)
        values = torch.cat([values[:, :, :start], value_slots.to(values.dtype), values[:, :, end:]], dim=2)
        self.last_stats[layer] = {"tokens": num_tokens, "cache_len": keys.shape[2], "slots": num_slots,
                                  "middle": middle, **stats}
        return keys, values

    def fusable(self, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """The fused CUDA kernel computes exactly this press: iwdft, every bin, post-RoPE keys,
        and no error statistics to record (they need the float32 middle)."""
        return (self.fused and self.variant == "iwdft" and self.plan is None and self.key_space == "post_rope"
                and not self.record_errors and fused.can_fuse(keys) and fused.can_fuse(values))

    @torch.no_grad()
    def errors(self, mid_keys, mid_values, key_slots, value_slots) -> dict:
        middle = mid_keys.shape[-2]
        key_diff = torch.linalg.vector_norm(mid_keys - expand(self.variant, key_slots, middle, self.step))
        value_diff = torch.linalg.vector_norm(mid_values - expand(self.variant, value_slots, middle, self.step))
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

        PerLayerCompressionPress(FAEDKVPress(window=64).as_scorer(), compression_ratios=[...])

    Per-layer ratios give layers different cache lengths; transformers builds its causal mask
    from layer 0, so this adapter switches an sdpa model to "faedkv_sdpa", which re-aligns the
    mask per layer (eager attention would silently mis-align it and is refused).
    """

    compression_ratio: float = 0.0
    press: FAEDKVPress = field(default_factory=FAEDKVPress)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.press, FAEDKVPress):
            raise ValueError("FAEDKVScorerPress wraps a FAEDKVPress")

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
        saved = self.press.compression_ratio
        self.press.compression_ratio = self.compression_ratio
        try:
            return self.press.compress(module, hidden_states, keys, values, attentions, kwargs)
        finally:
            self.press.compression_ratio = saved
