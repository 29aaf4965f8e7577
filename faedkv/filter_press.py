"""FrequencyFilterPress: remove frequency chunks from the middle without compressing (the ablation).

The middle's N tokens go through a lossless IWDFT (M = N bins), the plan's bins are kept, the
inverse DFT gives N slots, and each token position takes back its own slot, so the cache length
and token order are unchanged. With every chunk kept the cache is returned as it came (up to
float rounding); dropping chunk c removes exactly the middle's DFT bins of chunk c.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from kvpress.presses.base_press import BasePress
from torch import nn

from faedkv.iwdft import iwdft, iwdft_slots
from faedkv.plans import FrequencyPlan, bin_frequencies
from faedkv.variants import iwdft_expand

TARGETS = ("kv", "keys", "values")


def filter_band(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x (..., N, head_dim) with only the kept bins of its N-point spectrum; keep (N,) or (heads, N)."""
    num_tokens = x.shape[-2]
    slots = iwdft_slots(iwdft(x, num_tokens), keep)
    return iwdft_expand(slots, num_tokens)


@dataclass
class FrequencyFilterPress(BasePress):
    """Keep the cache length, zero the chunks the plan drops in the middle segment.

    plan: which chunks each layer keeps (keys and values separately, per head if the plan says so).
    target: "kv" filters keys and values, "keys" or "values" only one of them.
    Prompts with T <= sink_tokens + window have no middle and pass unchanged.
    """

    plan: FrequencyPlan = None
    sink_tokens: int = 4
    window: int = 64
    target: str = "kv"
    last_stats: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.plan, FrequencyPlan):
            raise ValueError("FrequencyFilterPress needs plan=FrequencyPlan(...)")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        for name in ("sink_tokens", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")

    @property
    def compression_ratio(self) -> float:
        return 0.0  # the cache length never changes

    def post_init_from_model(self, model):
        self.last_stats = {}
        layers = model.config.get_text_config().num_hidden_layers
        if self.plan.num_layers != layers:
            raise ValueError(f"plan {self.plan.name!r} has {self.plan.num_layers} layers but the "
                             f"model has {layers}")

    def mask(self, layer: int, kind: str, num_bins: int, heads: int) -> torch.Tensor:
        return self.plan.keep_frequencies(layer, bin_frequencies(num_bins), kind, heads)

    def compress(self, module: nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, attentions: torch.Tensor, kwargs: dict):
        num_tokens = keys.shape[2]
        start, end = self.sink_tokens, num_tokens - self.window
        if end - start < 1:
            return keys, values
        layer, heads, middle = module.layer_idx, keys.shape[1], end - start
        if self.target in ("kv", "keys"):
            mid = filter_band(keys[:, :, start:end], self.mask(layer, "key", middle, heads))
            keys = torch.cat([keys[:, :, :start], mid.to(keys.dtype), keys[:, :, end:]], dim=2)
        if self.target in ("kv", "values"):
            mid = filter_band(values[:, :, start:end], self.mask(layer, "value", middle, heads))
            values = torch.cat([values[:, :, :start], mid.to(values.dtype), values[:, :, end:]], dim=2)
        self.last_stats[layer] = {"tokens": num_tokens, "cache_len": num_tokens, "middle": middle}
        return keys, values
