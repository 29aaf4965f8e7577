"""FAEDKV: frequency-domain KV-cache compression (IWDFT, variants, plans, press, decoding cache)."""
from faedkv.attention import FAEDKV_SDPA, use_faedkv_attention
from faedkv.cache import FAEDKVCache
from faedkv.contribution import contribution_profile, equality_summary
from faedkv.filter_press import FrequencyFilterPress
from faedkv.iwdft import iwdft, iwdft_slots, iwdft_update
from faedkv.plans import FrequencyPlan
from faedkv.press import FAEDKVPress, FAEDKVScorerPress
from faedkv.variants import VARIANTS, compression_matrix

__all__ = ["iwdft", "iwdft_update", "iwdft_slots", "compression_matrix", "FrequencyPlan",
           "FAEDKVPress", "FAEDKVScorerPress", "FrequencyFilterPress", "FAEDKVCache",
           "contribution_profile", "equality_summary", "VARIANTS", "FAEDKV_SDPA",
           "use_faedkv_attention"]
