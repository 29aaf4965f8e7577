"""FAEDKVCache's decoding: `cache.py` (FAEDKVCache, its layers and their decode steps),
`slots.py` (what a layer hands the attention: SlotState, Handoff; slot attention over the
stored ring means) and `kernels.py` (Triton: the one-kernel decode step, the fold step, the
split-KV slot attention). Nothing is imported here: `faedkv.decode.cache` imports transformers.
"""
