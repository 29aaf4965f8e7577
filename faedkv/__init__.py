"""FAEDKV: frequency-domain KV-cache compression (IWDFT, variants, plans, press, decoding cache).

`import faedkv` imports torch and the math (pure torch) only: the press, the cache and the
attention, which import kvpress and transformers and register faedkv's attention with
transformers, load on first use of their names.
"""
from importlib import import_module

from faedkv.budget import kept_rows, layout
from faedkv.contribution import contribution_profile, equality_summary
from faedkv.iwdft import iwdft, iwdft_slots, iwdft_update
from faedkv.plans import FrequencyPlan
from faedkv.variants import VARIANTS, compression_matrix, slot_mass

_LAZY = {
    "FAEDKVPress": "faedkv.press", "FAEDKVScorerPress": "faedkv.press",
    "FrequencyFilterPress": "faedkv.filter_press",
    "FAEDKVCache": "faedkv.decode.cache", "DimsplitCache": "faedkv.decode.dimsplit",
    "StaticFAEDKVCache": "faedkv.decode.static",
    "FAEDKV_SDPA": "faedkv.attention", "use_faedkv_attention": "faedkv.attention",
}

__all__ = ["iwdft", "iwdft_update", "iwdft_slots", "compression_matrix", "slot_mass", "FrequencyPlan",
           "kept_rows", "layout", "contribution_profile", "equality_summary", "VARIANTS", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'faedkv' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
