"""FAEDKVCache's decoding: `cache.py` (FAEDKVCache, its layers and their decode steps),
`slots.py` (what a layer hands the attention: SlotState, Handoff; slot attention over the
stored ring means) and `kernels.py` (Triton: the one-kernel decode step, the fold step, the
split-KV slot attention); `static.py` (StaticFAEDKVCache: the same rows and math as a fixed-shape
one-token step that torch.compile traces once and CUDA graphs replay); `dimsplit.py`
(DimsplitCache: the dimension split stored physically). Nothing is imported here:
`faedkv.decode.cache` imports transformers.
"""
