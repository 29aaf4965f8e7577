"""`python -m analysis.bench gpu`: compression and decoding at Llama-3-8B scale, against the floor.

1. compress: per-layer prefill compression of a Llama-3-8B-shaped cache (32 layers x 8 KV heads x
   128 dims, bf16, fresh random draws per layer) for every FAEDKV variant, kvpress SnapKV and
   StreamingLLM at ratio 0.75, timed with CUDA events; the floor is the bytes that must move
   (read K and V once, write the kept rows) over the copy bandwidth measured in the same run.
2. decode: a random-weight Llama-3-8B (bf16, sdpa) decoding one token at a time after a 32K /
   128K context held by FAEDKVCache, a full DynamicCache, or a DynamicCache compressed by
   kvpress's SnapKVPress. The context's K/V are random (decode cost does not depend on their
   values), handed to each cache layer by layer exactly as a prefill would. Reports median ms per
   token (CUDA events), persistent KV bytes, peak memory over the decode, and the share of a step
   spent in the cache's update (an instrumented pass that synchronises around every update).
3. needle: the SmolLM2 needle grid on the GPU up to 8K (`python -m analysis needle`), when the
   embedded model is available (package or FAEDKV_EMBEDDED_GGUF).
4. real-compress: per-layer prefill compression of a real model's own cache (--model, at
   --real-lengths): the shipped FAEDKV default, dimsplit, the KeyDiff hybrid, SnapKV, KeyDiff and
   StreamingLLM on each layer's K/V, hidden states and attention kwargs captured from one prefill
   of essay text (analysis/bench/real_compress.py). The one part that also runs on the CPU
   (perf_counter, host copy bandwidth), for tests and dry runs.

Everything goes to --out (gpu-bench.json with every row, gpu-bench.md with the tables, needle
store under needle/); the tables are printed last.
"""
from __future__ import annotations

import datetime
import json
import os
import shlex
import statistics
import subprocess
import types
import sys
from pathlib import Path

from analysis.bench.common import machine_description, write_fragment
from analysis.bench.compress import compress_benchmark, llama3_layer
from analysis.bench.real_compress import (DEFAULT_REAL_LENGTHS, REAL_METHODS, check_lengths,
                                          copy_bandwidth_host, floor_bytes, model_summary, real_compress_markdown,
                                          real_compress_rows)
from analysis.harness.models import LLAMA3_8B


def cuda_ms(fn, repeats: int, warmup: int = 2) -> list[float]:
    """Times of fn() in ms by CUDA events, after `warmup` untimed calls."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def copy_bandwidth(gib: float = 2.0) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting the bytes read and written."""
    import torch

    src = torch.randint(0, 255, (int(gib * 2**30),), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = statistics.median(cuda_ms(lambda: dst.copy_(src), repeats=10))
    return 2 * src.numel() / (ms / 1000)


# --- 1. compression ---------------------------------------------------------------------------
def compress_rows(lengths, layers: int, bandwidth: float, methods) -> list[dict]:
    rows = compress_benchmark(lengths, layers=layers, device="cuda", methods=methods)
    for row in rows:
        # K and V of 8 heads x 128 dims in bf16: read all tokens, write the kept rows.
        moved = floor_bytes(8 * 128 * 2, row["tokens"], row["cache_len"])
        row["floor_ms"] = moved / bandwidth * 1000
        row["vs_floor"] = row["median_ms"] / row["floor_ms"]
    return rows


def fused_agreement(lengths, ratio: float = 0.75) -> list[dict]:
    """Max |fused - torch| / max |torch| of FAEDKVPress's compressed K at each length (bf16)."""
    import torch

    from faedkv import FAEDKVPress

    module, config = llama3_layer("cuda", torch.bfloat16)
    rows = []
    for tokens in lengths:
        keys = torch.randn(1, config.num_key_value_heads, tokens, config.head_dim, device="cuda",
                           dtype=torch.bfloat16)
        fast = FAEDKVPress(compression_ratio=ratio, variant="iwdft", record_errors=False)
        slow = FAEDKVPress(compression_ratio=ratio, variant="iwdft", record_errors=False, fused=False)
        with torch.no_grad():
            a, _ = fast.compress(module, None, keys, keys, None, {})
            b, _ = slow.compress(module, None, keys, keys, None, {})
        rows.append({"tokens": tokens, "fused_used": fast.fusable(keys, keys),
                     "max_rel_diff": float((a.float() - b.float()).abs().max() / b.float().abs().max())})
    return rows


DEFAULT_FRAGMENT = "benchmarks/gpu-h200.md"
DECODE_KINDS = ("full", "snapkv", "faedkv", "faedkv-attn", "faedkv-torch", "faedkv-plan", "faedkv-attn-plan")
DEFAULT_GPU_METHODS = ("iwdft", "iwdft-torch", "iwdft-lowpass", "resample", "snapkv", "streamingllm")


# --- 2. decoding ------------------------------------------------------------------------------
def llama3_8b(device: str = "cuda"):
    """Llama-3-8B with its own 128256-token vocabulary, random bf16 weights, sdpa."""
    import torch

    from analysis.harness.models import build_random_llama3_8b

    return build_random_llama3_8b(LLAMA3_8B["vocab_size"], device, torch.bfloat16, "sdpa")


def cache_bytes(cache) -> int:
    """Persistent bytes of a cache: FAEDKVCache.memory_bytes(), or a DynamicCache's tensors."""
    if hasattr(cache, "memory_bytes"):
        return cache.memory_bytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (layer.keys, layer.values) if t is not None)


def filled_cache(kind: str, model, tokens: int, ratio: float):
    """A cache holding a `tokens`-long random context, as a prefill would have left it.

    Returns (cache, cache_position of the next token)."""
    import torch
    from kvpress import SnapKVPress
    from transformers import DynamicCache

    from faedkv import FAEDKVCache, FrequencyPlan

    config = model.config
    shape = (1, config.num_key_value_heads, tokens, config.head_dim)
    if kind.startswith("faedkv"):
        # faedkv: one kernel writes the slots (kernels.decode_step_into); faedkv-attn: the
        # model runs faedkv's attention, which scales the stored means (FoldStep +
        # SlotAttention); faedkv-torch: the torch path; *-plan: with a low-pass plan (half the
        # chunks in every layer): faedkv-plan materialises band-limited slots (an FFT over the
        # M rows per step), faedkv-attn-plan band-limits logits and probabilities in attention
        plan = FrequencyPlan.low_pass(0.5, config.num_hidden_layers) if kind.endswith("-plan") else None
        cache = FAEDKVCache(compression_ratio=ratio, sink_tokens=4, window=64, plan=plan,
                            fused=False if kind == "faedkv-torch" else None)
    else:
        cache = DynamicCache()
    positions = torch.arange(tokens, device="cuda")
    if kind == "snapkv":
        press = SnapKVPress(compression_ratio=ratio, window_size=64)
        hidden = torch.randn(1, tokens, config.hidden_size, device="cuda", dtype=torch.bfloat16)
        cos, sin = model.model.rotary_emb(hidden, positions.unsqueeze(0))
        kwargs = {"position_embeddings": (cos, sin), "cache_position": positions,
                  "position_ids": positions.unsqueeze(0)}
    for layer in range(config.num_hidden_layers):
        keys = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        values = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        if kind == "snapkv":
            with torch.no_grad():
                keys, values = press.compress(model.model.layers[layer].self_attn, hidden, keys,
                                              values, None, kwargs)
        cache.update(keys, values, layer)
        del keys, values
    if kind == "snapkv":
        del hidden, cos, sin
    # DynamicCache counts stored rows; FAEDKVCache counts tokens seen (true positions).
    return cache, cache.get_seq_length()


def decode_row(model, kind: str, tokens: int, ratio: float, steps: int) -> dict:
    from faedkv.attention import restore_sdpa, use_faedkv_attention

    if not kind.startswith("faedkv-attn"):
        return decode_row_measured(model, kind, tokens, ratio, steps)
    use_faedkv_attention(model.config)
    try:
        return decode_row_measured(model, kind, tokens, ratio, steps)
    finally:
        restore_sdpa(model.config)


def decode_row_measured(model, kind: str, tokens: int, ratio: float, steps: int) -> dict:
    import torch

    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    cache, next_position = filled_cache(kind, model, tokens, ratio)
    torch.cuda.synchronize()
    kv_bytes = cache_bytes(cache)
    after_fill = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    state = {"position": tokens, "cache_position": next_position}
    token = torch.randint(0, model.config.vocab_size, (1, 1), device="cuda")

    def step():
        with torch.no_grad():
            model(input_ids=token,
                  position_ids=torch.tensor([[state["position"]]], device="cuda"),
                  cache_position=torch.tensor([state["cache_position"]], device="cuda"),
                  past_key_values=cache, use_cache=True, logits_to_keep=1)
        state["position"] += 1
        state["cache_position"] += 1

    times = cuda_ms(step, repeats=steps, warmup=3)
    peak = torch.cuda.max_memory_allocated()
    update_share = instrumented_update_share(cache, step, repeats=5)
    update_gpu_share = profiled_update_share(cache, step, repeats=5)
    row = {"tokens": tokens, "cache": kind, "ratio": ratio if kind != "full" else 0.0,
           "ms_per_token": statistics.median(times), "steps": steps,
           "kv_bytes": kv_bytes, "peak_over_weights": peak - weights,
           "decode_transient": peak - after_fill, "update_share": update_share,
           **update_gpu_share}
    cache = None  # free this cache's memory before the next row is measured
    torch.cuda.empty_cache()
    return row


def instrumented_update_share(cache, step, repeats: int) -> float:
    """Share of a decode step spent in cache.update: a separate pass that synchronises around
    every update call (wall time) and around the whole step."""
    import time

    import torch

    spent = []
    original = cache.update

    def timed_update(*args, **kwargs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = original(*args, **kwargs)
        torch.cuda.synchronize()
        spent.append(time.perf_counter() - start)
        return out

    cache.update = timed_update
    shares = []
    try:
        for _ in range(repeats):
            spent.clear()
            torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            shares.append(sum(spent) / (time.perf_counter() - start))
    finally:
        del cache.update
    return statistics.median(shares)


def profiled_update_share(cache, step, repeats: int) -> dict:
    """Share of a step's GPU kernel time spent in kernels launched by cache.update (torch
    profiler, CUPTI): what the update would cost if the host did not bound the step (CUDA graphs,
    a compiled decoder). Also the GPU time of faedkv's attention kernels and of the plan's
    band-limiting in attention (faedkv.decode.slots.band_limit, labelled while profiling)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    from faedkv.decode import slots
    from faedkv.decode.kernels import ATTENTION_KERNELS, UPDATE_KERNELS

    original, band_limit = cache.update, slots.band_limit

    def labelled_update(*args, **kwargs):
        with record_function("faedkv.cache.update"):
            return original(*args, **kwargs)

    def labelled_band_limit(*args, **kwargs):
        with record_function("faedkv.band_limit"):
            return band_limit(*args, **kwargs)

    cache.update, slots.band_limit = labelled_update, labelled_band_limit
    try:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                step()
            torch.cuda.synchronize()
    finally:
        del cache.update
        slots.band_limit = band_limit
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]

    def launched_under(event) -> list:
        return list(event.kernels) + [k for child in event.cpu_children for k in launched_under(child)]

    def attributed_to(name: str) -> list:
        return [k for e in events if e.name == name and e.device_type == DeviceType.CPU
                for k in launched_under(e)]

    attributed = attributed_to("faedkv.cache.update")
    band_limiting = sum(k.duration for k in attributed_to("faedkv.band_limit"))
    # Triton launches through the driver, which the profiler may not link to the enclosing
    # range; only the cache launches FAEDKV's kernels, so the unlinked ones are the update's too.
    linked = sum(1 for k in attributed if k.name in UPDATE_KERNELS)
    ours = sorted(e.self_device_time_total for e in kernels if e.name in UPDATE_KERNELS)
    in_update = sum(k.duration for k in attributed) + sum(ours[linked:])
    total = sum(e.self_device_time_total for e in kernels)
    slot_attention = sum(e.self_device_time_total for e in kernels if e.name in ATTENTION_KERNELS)
    return {"update_gpu_share": in_update / total if total else None,
            "step_gpu_ms": total / 1e3 / repeats, "update_gpu_ms": in_update / 1e3 / repeats,
            "slot_attention_gpu_ms": slot_attention / 1e3 / repeats,
            "band_limit_gpu_ms": band_limiting / 1e3 / repeats}


def slot_attention_rows(lengths, bandwidth: float, ratio: float = 0.75) -> list[dict]:
    """kernels.SlotAttention against torch's sdpa (GQA, the same rows, no scales) for one decode
    token of Llama-3-8B's 32 query heads over the 8 KV heads' S + M + W stored rows (bf16),
    for a few launch shapes; CUDA events, median of 100 calls. Floor = reading K and V once."""
    import torch
    import torch.nn.functional as F

    from faedkv.budget import layout
    from faedkv.decode.kernels import SlotAttention

    heads, kv_heads, dim = LLAMA3_8B["num_attention_heads"], LLAMA3_8B["num_key_value_heads"], LLAMA3_8B["head_dim"]
    rows = []
    for tokens in lengths:
        slots = layout(tokens, ratio, 4, 64).slots
        stored = 4 + slots + 64
        keys, values = (torch.randn(1, kv_heads, stored, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        query = torch.randn(1, 1, heads, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        out = query.new_empty(1, 1, heads, dim)
        floor = 1e3 * 2 * keys.numel() * keys.element_size() / bandwidth   # K and V read once
        sdpa = statistics.median(cuda_ms(lambda: F.scaled_dot_product_attention(query, keys, values, enable_gqa=True),
                                         repeats=100, warmup=5))
        rows.append({"tokens": tokens, "stored_rows": stored, "kernel": "sdpa", "block_n": None,
                     "programs": None, "ms": sdpa, "floor_ms": floor})
        for block_n in (32, 64, 128):
            for programs in (256, 512, 1024, 4096):
                # one layer's attention object, as a decode step uses it (direct launches)
                attention = SlotAttention(keys, values, 4, slots, block_n, programs)
                ms = statistics.median(cuda_ms(lambda: attention(out, query, slots // 3, 1.1, 0.7, dim ** -0.5),
                                               repeats=100, warmup=5))
                rows.append({"tokens": tokens, "stored_rows": stored, "kernel": "slot_attention",
                             "block_n": block_n, "programs": programs, "ms": ms, "floor_ms": floor})
    return rows


def host_overhead_rows(tokens: int, ratio: float = 0.75, calls: int = 300) -> list[dict]:
    """Host time per call (perf_counter over `calls` calls, no synchronisation inside) of what a
    decode step launches per layer: the step is bound by the host, so this is its real cost.
    Llama-3-8B-shaped layer, bf16, one new token."""
    import time

    import torch
    import torch.nn.functional as F

    from faedkv.decode.slots import slot_attention

    heads, kv_heads, dim = LLAMA3_8B["num_attention_heads"], LLAMA3_8B["num_key_value_heads"], LLAMA3_8B["head_dim"]
    new = [torch.randn(1, kv_heads, 1, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    query = torch.randn(1, 1, heads, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    materialised, scaled = materialised_and_scaled_layers(tokens, ratio)
    stored = materialised.kv[0]
    keys, values = scaled.update(*new)
    scales = scaled.slot_state
    small = [torch.randn(1, kv_heads, 1024, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2)]

    def timed(name, fn):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        spent = (time.perf_counter() - start) / calls
        torch.cuda.synchronize()
        return {"tokens": tokens, "call": name, "host_us": 1e6 * spent}

    return [
        timed("FAEDKVLayer.update, one kernel writes the slots", lambda: materialised.update(*new)),
        timed("FAEDKVLayer.update, fold only (faedkv attention)", lambda: scaled.update(*new)),
        timed("slot_attention (2 kernels)", lambda: slot_attention(query, keys, values, scales,
                                                                  scaling=dim ** -0.5)),
        timed("sdpa over the same rows", lambda: F.scaled_dot_product_attention(
            query, stored, materialised.kv[1], enable_gqa=True)),
        timed("DynamicCache-like update (2 x torch.cat, 1K rows)", lambda: (torch.cat([small[0], new[0]], dim=-2),
                                                                            torch.cat([small[1], new[1]], dim=-2))),
    ]


def decode_kernel_rows(lengths, bandwidth: float, ratio: float = 0.75) -> list[dict]:
    """The one-kernel decode step alone on a Llama-3-8B-shaped layer (batch 1, bf16, q = 1) for
    a few launch shapes, CUDA events over 100 calls: time per layer against the floor (read
    sink + means + window + the new token, write the attended rows and the ring row)."""
    import torch

    from faedkv.decode import kernels
    from faedkv.decode.cache import FAEDKVLayer

    heads, dim = LLAMA3_8B["num_key_value_heads"], LLAMA3_8B["head_dim"]
    rows = []
    for tokens in lengths:
        layer = FAEDKVLayer(0, ratio, 4, 64)
        layer.update(*(torch.randn(1, heads, tokens, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2)))
        new = [torch.randn(1, heads, 1, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        attended = layer.sink_tokens + layer.num_slots + layer.window
        out = layer.kv.new_empty(layer.kv.shape)
        moved = 2 * heads * dim * 2 * (2 * attended + 2)   # K and V, bf16
        for block in (16, 32, 64):
            for warps in (2, 4, 8):
                def call():
                    kernels.decode_step_into(out, layer.sink, layer.means, layer.ring, *new,
                                           layer.head, layer.folded, block=block, num_warps=warps)
                ms = statistics.median(cuda_ms(call, repeats=100, warmup=5))
                rows.append({"tokens": tokens, "attended_rows": attended, "block": block,
                             "num_warps": warps, "ms_per_layer": ms, "floor_ms": 1e3 * moved / bandwidth,
                             "vs_floor": ms / (1e3 * moved / bandwidth)})
    return rows


# A layer used without a model: as if faedkv's attention had answered its probe but the model
# had been switched back to sdpa, so every call materialises [sink | slots | window | new].
MATERIALISING = types.SimpleNamespace(_attn_implementation="sdpa")


def decode_agreement(tokens: int, ratio: float = 0.75, steps: int = 64) -> dict:
    """The one-kernel decode step against the torch path on one Llama-3-8B-shaped layer: the
    same random prefill, then `steps` calls of one random token each (and one of 8), comparing
    what attention gets and the ring means after every call."""
    import torch

    from faedkv import FrequencyPlan
    from faedkv.decode.cache import FAEDKVLayer

    shape = (1, LLAMA3_8B["num_key_value_heads"], tokens, LLAMA3_8B["head_dim"])
    keys = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    values = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    layers = [FAEDKVLayer(0, ratio, 4, 64, fused=fused) for fused in (None, False)]
    for layer in layers:
        layer.update(keys, values)
        layer.slot_state.served_by(MATERIALISING)   # both materialise: kernel step vs torch path
    worst_out = worst_means = 0.0
    for size in [1] * steps + [8, 1]:
        new = [torch.randn(shape[:2] + (size, shape[-1]), device="cuda", dtype=torch.bfloat16)
               for _ in range(2)]
        (k1, v1), (k2, v2) = (layer.update(*new) for layer in layers)
        for a, b in ((k1, k2), (v1, v2)):
            worst_out = max(worst_out, ((a.float() - b.float()).abs().max() / b.float().abs().max()).item())
        a, b = layers[0].means.float(), layers[1].means.float()
        worst_means = max(worst_means, ((a - b).abs().max() / b.abs().max()).item())
    return {"tokens": tokens, "steps": steps + 2, "kernel_used": layers[0].head != 0,
            "max_rel_diff_attended": worst_out, "max_rel_diff_means": worst_means,
            **slot_attention_agreement(tokens, ratio),
            **slot_attention_agreement(tokens, ratio, plan=FrequencyPlan.low_pass(0.5, 1))}


def materialised_and_scaled_layers(tokens: int, ratio: float, plan=None, device: str = "cuda", dtype=None,
                                   fused=None):
    """Two FAEDKVLayers holding the same random Llama-3-8B-shaped prefill (bf16 unless `dtype`):
    one that materialises the slots, one that hands faedkv's attention the ring means (as if
    that attention had answered the probe of a model that runs it)."""
    import torch

    from faedkv.attention import FAEDKV_SDPA
    from faedkv.decode.cache import FAEDKVLayer

    shape = (1, LLAMA3_8B["num_key_value_heads"], tokens, LLAMA3_8B["head_dim"])
    context = [torch.randn(shape, device=device, dtype=dtype or torch.bfloat16) for _ in range(2)]
    materialised, scaled = (FAEDKVLayer(0, ratio, 4, 64, plan=plan, fused=fused) for _ in range(2))
    for layer in (materialised, scaled):
        layer.update(*context)
    materialised.slot_state.served_by(MATERIALISING)
    scaled.slot_state.served_by(types.SimpleNamespace(_attn_implementation=FAEDKV_SDPA))
    return materialised, scaled


def slot_attention_agreement(tokens: int, ratio: float, steps: int = 16, plan=None,
                             device: str = "cuda", dtype=None, fused=None) -> dict:
    """Slot-scaled attention (FoldStep + SlotAttention over the stored ring means; with a plan,
    the band-limiting attention) against sdpa over the materialised slots with the same log-count
    bias (decode_step_into; with a plan, the torch path's FFT), bf16 unless `dtype`, Llama-3-8B's
    32 query heads over 8 KV heads, one random query per step: max relative difference of the
    outputs. (The CPU test runs it in float32 with fused=True: Triton's interpreter.)"""
    import torch
    import torch.nn.functional as F

    from faedkv.decode.slots import posted, slot_attention

    heads, kv_heads, dim = LLAMA3_8B["num_attention_heads"], LLAMA3_8B["num_key_value_heads"], LLAMA3_8B["head_dim"]
    module = types.SimpleNamespace(layer_idx=0)   # what faedkv_sdpa reads the layers' handoffs with
    dtype = dtype or torch.bfloat16
    materialised, scaled = materialised_and_scaled_layers(tokens, ratio, plan, device, dtype, fused)
    worst, used = 0.0, True
    for _ in range(steps):
        new = [torch.randn(1, kv_heads, 1, dim, device=device, dtype=dtype) for _ in range(2)]
        query = torch.randn(1, 1, heads, dim, device=device, dtype=dtype).transpose(1, 2)
        keys, values = materialised.update(*new)
        start, log_counts = posted(module, keys).mass        # the slots' mass, as faedkv_sdpa adds it
        bias = torch.zeros(1, 1, 1, keys.shape[-2], device=device, dtype=keys.dtype)   # sdpa wants >= 2-D
        bias[..., start:start + log_counts.shape[-1]] = log_counts.to(bias.device, bias.dtype)
        expected = F.scaled_dot_product_attention(query, keys, values, attn_mask=bias,
                                                  enable_gqa=True).transpose(1, 2)
        keys, values = scaled.update(*new)
        handoff = posted(module, keys)
        used &= handoff.in_place
        got, _ = slot_attention(query, keys, values, handoff.slots(), scaling=dim ** -0.5)
        worst = max(worst, ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item())
    suffix = "" if plan is None else "_plan"
    return {f"slot_attention_used{suffix}": bool(used), f"max_rel_diff_slot_attention{suffix}": worst}


def decode_rows(lengths, ratio: float, steps: int, kinds=DECODE_KINDS) -> list[dict]:
    from tqdm import tqdm

    model = llama3_8b()
    rows = []
    for tokens in lengths:
        for kind in tqdm(kinds, desc=f"decode {tokens}"):
            rows.append(decode_row(model, kind, tokens, ratio, steps))
    full = {r["tokens"]: r for r in rows if r["cache"] == "full"}
    for r in rows:
        base = full.get(r["tokens"])
        r["kv_vs_full"] = r["kv_bytes"] / base["kv_bytes"] if base else None
        r["speed_vs_full"] = base["ms_per_token"] / r["ms_per_token"] if base else None
    return rows


# --- 3. needle --------------------------------------------------------------------------------
def needle_grid(out: Path, store: Path, lengths: str, samples: int, query_mode: str) -> dict:
    """The needle grid through the CLI (its store resumes a killed run); returns its summary."""
    command = [sys.executable, "-m", "analysis", "needle", "--device", "cuda",
               "--methods", "full,streaming_llm,snapkv,faedkv,faedkv:variant=resample",
               "--ratios", "0.5,0.75", "--lengths", lengths, "--depths", "0,50,100",
               "--samples", str(samples), "--query-mode", query_mode, "--out", str(store),
               "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True)
    (out / "needle.log").write_text(done.stdout + done.stderr)
    return {"command": " ".join(command[1:]), "returncode": done.returncode,
            "table": done.stdout.strip()}


GRID_METHODS = ("streaming_llm", "snapkv", "h2o", "pyramidkv", "faedkv", "faedkv:variant=resample",
                "dct_iterative")


def needle_grid_parallel(out: Path, store: Path, lengths: str, depths: str, ratios: str,
                         samples: int, timeout_s: float | None = None) -> dict:
    """The issue's full needle grid, one CLI process per method on the same GPU (a 135M model
    leaves the GPU idle; the host's Python is the bottleneck), merged into one table. Each
    process also runs `full` (the harness always adds it); the merged table keeps one. After
    timeout_s the unfinished processes are stopped (their finished cells stay in their stores:
    the same command resumes them) and the table says which methods are missing."""
    import glob
    import time

    from analysis.tasks.needle import needle_markdown

    processes = []
    for i, method in enumerate(GRID_METHODS):
        command = [sys.executable, "-m", "analysis", "needle", "--device", "cuda", "--methods", method,
                   "--ratios", ratios, "--lengths", lengths, "--depths", depths,
                   "--samples", str(samples), "--out", str(store / f"m{i}"), "--no-progress"]
        log = open(out / "grid.log", "a")
        processes.append((command, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    codes, missing = [], []
    for (command, process), method in zip(processes, GRID_METHODS):
        try:
            left = None if deadline is None else max(1.0, deadline - time.monotonic())
            codes.append(process.wait(timeout=left))
        except subprocess.TimeoutExpired:
            process.terminate()
            codes.append(process.wait())
            missing.append(method)
    merged: dict = {}
    for i in range(len(GRID_METHODS)):
        for path in glob.glob(str(store / f"m{i}" / "runs" / "needle-*" / "metrics.json")):
            metrics = json.loads(Path(path).read_text())
            if not merged:
                merged = {**metrics, "by_method": [], "by_length": [], "by_cell": []}
            seen = {r["label"] for r in merged["by_method"]}
            for level in ("by_method", "by_length", "by_cell"):
                merged[level] += [r for r in metrics[level] if r["label"] not in seen]
    table = needle_markdown(merged, detail=True) if merged else "no run finished"
    if missing:
        table += (f"\n\nNot finished within {timeout_s:.0f} s (stopped; the same command resumes "
                  f"them): {', '.join(missing)}.")
    shown = " ".join(processes[0][0][1:]).replace(GRID_METHODS[0], "<method>")
    return {"command": f"{shown}  (one process per method: {', '.join(GRID_METHODS)})",
            "returncode": max(codes), "table": table}


# --- report -----------------------------------------------------------------------------------
def gpu_cells(row: dict) -> str:
    """'GPU ms | update GPU share' of a decode row ('- | -' for runs from before the profiler)."""
    if row.get("update_gpu_share") is None:
        return "- | -"
    return f"{row['step_gpu_ms']:.2f} | {100 * row['update_gpu_share']:.1f}%"


def tables(result: dict) -> str:
    gb = 1e9
    result.setdefault("parts", [p for p in ("compress", "decode", "needle") if result.get(p)])
    result["parts"] = ["needle grid" if p == "grid" else p for p in result["parts"]]
    real_model = result.get("real_compress_model") or {}
    where = []
    if set(result["parts"]) - {"real-compress"}:
        where.append("at Llama-3-8B scale")
    if "real-compress" in result["parts"]:
        where.append(f"on {real_model.get('name', 'a real model')}'s cache")
    bandwidth = (f"{result['bandwidth'] / 1e12:.2f} TB/s" if result["bandwidth"] >= 1e11
                 else f"{result['bandwidth'] / 1e9:.1f} GB/s")
    # a CPU run of the real-compress part (tests, dry runs) says so in its heading
    label = "CPU" if result["parts"] == ["real-compress"] and real_model.get("device") == "cpu" else "GPU"
    lines = [f"### {label}: {', '.join(result['parts'])} {'; '.join(where)} ({result['date']})", "",
             f"Command: `python -m analysis.bench gpu {result['argv']}`", "",
             f"Machine: {result['machine']}. Copy bandwidth measured in the run: "
             f"{bandwidth} (read + write)."]
    if result.get("real_compress"):
        lines.append(real_compress_markdown(result["real_compress"], real_model, result.get("real_compress_flush_l2")))
    if result["compress"]:
        lines += ["", f"Prefill compression per layer, ratio 0.75, median of {result['layers']} layers "
                  "(fresh bf16 draws each), CUDA events around the press's compress call (Python "
                  "included); floor = (read K,V + write kept rows) / bandwidth.", "",
                  "| tokens | method | cache rows | median ms / layer | ms for 32 layers | floor ms | x floor | x SnapKV "
                  "| host ms / call | GPU-busy ms / call | GPU-busy x floor |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["compress"]:
            snap = f"{r['vs_snapkv']:.2f}" if r["vs_snapkv"] is not None else "-"
            busy = r.get("kernel_ms")
            lines.append(f"| {r['tokens']} | {r['method']} | {r['cache_len']} | {r['median_ms']:.3f} | "
                         f"{32 * r['median_ms']:.2f} | {r['floor_ms']:.3f} | {r['vs_floor']:.2f} | {snap} | "
                         + (f"{r['host_ms']:.3f} | {busy:.3f} | {busy / r['floor_ms']:.2f} |" if busy is not None
                            else "- | - | - |"))
        lines.append("\nhost ms: the host's median time to return from the call (Python and launches); GPU-busy: "
                     "the device operations' time per call under torch.profiler (3 calls). Events near the host "
                     "time and far above GPU-busy mean the call is bound by the host, not by the GPU.")
        profiled = [r for r in result["compress"] if r.get("host_functions")]
        if profiled:
            lines.append("\nWhere the host's time goes (cProfile, 20 calls; own time per call, the largest first):\n")
            lines += [f"- {r['tokens']} {r['method']}: "
                      + "; ".join(f"`{name}` {ms:.3f} ms" for name, ms in r["host_functions"]) for r in profiled]
        for c in result.get("fused_check", []):
            lines.append(f"\nFused vs torch path at {c['tokens']} tokens: fused kernel used: "
                         f"{c['fused_used']}, max relative difference {c['max_rel_diff']:.1e}.")
    if result["decode"]:
        lines += ["", f"Decoding, random-weight Llama-3-8B (bf16, sdpa, batch 1), ratio 0.75; median of "
                  f"{result['decode'][0]['steps']} tokens (CUDA events) after 3 warm-up steps. KV = "
                  "persistent cache bytes; peak = max allocated during the decode minus weights; update "
                  "share (wall) from a separate pass synchronised around every cache.update; GPU ms = "
                  "kernel time per step and update GPU share = the update's share of it (torch "
                  "profiler), what the update would cost in a decoder the host does not bound.", "",
                  "| context | cache | ms / token | x full speed | KV GB | KV x full | peak over weights GB "
                  "| update share (wall) | GPU ms / step | update GPU share |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["decode"]:
            lines.append(f"| {r['tokens']} | {r['cache']} | {r['ms_per_token']:.2f} | {r['speed_vs_full']:.2f} | "
                         f"{r['kv_bytes'] / gb:.2f} | {r['kv_vs_full']:.3f} | {r['peak_over_weights'] / gb:.2f} | "
                         f"{100 * r['update_share']:.1f}% | {gpu_cells(r)} |")
        for r in result["decode"]:
            if r.get("slot_attention_gpu_ms"):
                lines.append(f"\n{r['cache']} at {r['tokens']}: its slot attention kernels take "
                             f"{r['slot_attention_gpu_ms']:.2f} of the step's {r['step_gpu_ms']:.2f} GPU ms "
                             "(in the attention, not in the update).")
            if r.get("band_limit_gpu_ms"):
                lines.append(f"\n{r['cache']} at {r['tokens']}: band-limiting the ring rows' logits and "
                             f"probabilities (the plan, in attention) takes {r['band_limit_gpu_ms']:.2f} of the "
                             f"step's {r['step_gpu_ms']:.2f} GPU ms "
                             f"({100 * r['band_limit_gpu_ms'] / r['step_gpu_ms']:.1f}%).")
        check = result.get("decode_check")
        if check:
            lines.append(f"\nfaedkv = the one-kernel decode step (faedkv.decode.kernels.decode_step_into), faedkv-torch "
                         f"= the same cache on the torch path. Kernel vs torch path over {check['steps']} calls "
                         f"after a {check['tokens']}-token prefill: kernel used: {check['kernel_used']}, max "
                         f"relative difference {check['max_rel_diff_attended']:.1e} in what attention gets, "
                         f"{check['max_rel_diff_means']:.1e} in the ring means.")
            if "max_rel_diff_slot_attention" in check:
                lines.append(f"faedkv-attn = the model runs faedkv's attention, which scales the stored ring "
                             f"means itself (FoldStep + SlotAttention: no slot written). Its "
                             f"output vs sdpa over the materialised slots, bf16, 16 steps: slot "
                             f"attention used: {check['slot_attention_used']}, max relative difference "
                             f"{check['max_rel_diff_slot_attention']:.1e}.")
            if "max_rel_diff_slot_attention_plan" in check:
                lines.append(f"faedkv-attn-plan = the same with a low-pass plan (half the chunks): the attention "
                             f"band-limits the ring rows' logits and probabilities (an FFT over M numbers "
                             f"per query head) instead of the cache writing band-limited slots. Its output "
                             f"vs sdpa over the torch path's band-limited slots, bf16, 16 steps: used: "
                             f"{check['slot_attention_used_plan']}, max relative difference "
                             f"{check['max_rel_diff_slot_attention_plan']:.1e}.")
    if result.get("decode_kernel"):
        lines += ["", "The one-kernel decode step alone per layer (q = 1, bf16, batch 1), median of 100 "
                  "calls (CUDA events, launch included); floor = (read sink + means + window, write "
                  "the attended rows) / bandwidth. Each length's fastest launch shape:", "",
                  "| context | attended rows | rows / program | warps | ms / layer | floor ms | x floor |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for tokens in sorted({r["tokens"] for r in result["decode_kernel"]}):
            best = min((r for r in result["decode_kernel"] if r["tokens"] == tokens), key=lambda r: r["ms_per_layer"])
            lines.append(f"| {tokens} | {best['attended_rows']} | {best['block']} | {best['num_warps']} | "
                         f"{best['ms_per_layer']:.4f} | {best['floor_ms']:.4f} | {best['vs_floor']:.2f} |")
    if result.get("slot_attention_kernel"):
        lines += ["", "Attention of one decode token over the stored rows (32 query heads, 8 KV heads, "
                  "bf16), median of 100 calls (CUDA events, launch included); floor = reading K and V "
                  "once / copy bandwidth. sdpa = torch's (no slot scales); "
                  "slot_attention = faedkv's split-KV kernel with the scales, its fastest launch shape:", "",
                  "| context | stored rows | kernel | rows / tile | programs | ms / layer | floor ms | x floor |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|"]
        for tokens in sorted({r["tokens"] for r in result["slot_attention_kernel"]}):
            mine = [r for r in result["slot_attention_kernel"] if r["tokens"] == tokens]
            for r in (next(r for r in mine if r["kernel"] == "sdpa"),
                      min((r for r in mine if r["kernel"] != "sdpa"), key=lambda r: r["ms"])):
                lines.append(f"| {tokens} | {r['stored_rows']} | {r['kernel']} | {r['block_n'] or '-'} | "
                             f"{r['programs'] or '-'} | {r['ms']:.4f} | {r['floor_ms']:.4f} | {r['ms'] / r['floor_ms']:.2f} |")
    if result.get("host_overhead"):
        lines += ["", f"Host time per call at {result['host_overhead'][0]['tokens']} tokens (perf_counter "
                  "over 300 calls, no synchronisation inside; a decode step that is bound by the host "
                  "pays this per layer):", "", "| call | host µs |", "|---|---:|"]
        lines += [f"| {r['call']} | {r['host_us']:.1f} |" for r in result["host_overhead"]]
    needle = result.get("needle")
    if needle:
        lines += ["", f"Needle grid, {result.get('model', 'SmolLM2-135M-Instruct')} (bf16) on the GPU: `python {needle['command']}` "
                  f"(exit {needle['returncode']})", "", needle["table"]]
    return "\n".join(lines) + "\n"


def run_gpu(args) -> int:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and set(args.parts) - {"real-compress"}:
        raise SystemExit("python -m analysis.bench gpu needs a CUDA GPU (torch sees none); only "
                         "--parts real-compress also runs on the CPU")
    device = "cuda" if cuda else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"date": datetime.date.today().isoformat(), "machine": machine_description(device),
              "layers": args.layers, "compress": [], "decode": [], "argv": shlex.join(sys.argv[2:]),
              "parts": args.parts}

    def save():
        tmp = out / "gpu-bench.json.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, out / "gpu-bench.json")

    loaded = None
    if "real-compress" in args.parts:   # first: the model's lengths are checked before anything runs
        from analysis.harness.models import load_model

        loaded = load_model(args.model, device=device)
        try:
            check_lengths(args.real_lengths, loaded)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    result["bandwidth"] = copy_bandwidth() if cuda else copy_bandwidth_host()
    if loaded is not None:
        result["real_compress_model"] = model_summary(loaded)
        result["real_compress_flush_l2"] = args.flush_l2

        def saved_rows(rows):
            result["real_compress"] = rows
            save()

        real_compress_rows(loaded, args.real_lengths, result["bandwidth"], args.real_methods,
                           args.real_repeats, flush_l2=args.flush_l2, on_length=saved_rows)
        loaded = None   # free the model before the other parts
        if cuda:
            torch.cuda.empty_cache()

    if "compress" in args.parts:
        result["fused_check"] = fused_agreement(args.lengths)
        result["compress"] = compress_rows(args.lengths, args.layers, result["bandwidth"], args.methods)
        save()
    if "decode" in args.parts:
        result["decode_check"] = decode_agreement(args.decode_lengths[0])
        if args.kernel_sweeps:
            result["decode_kernel"] = decode_kernel_rows(args.decode_lengths, result["bandwidth"])
            result["slot_attention_kernel"] = slot_attention_rows(args.decode_lengths, result["bandwidth"])
            result["host_overhead"] = host_overhead_rows(args.decode_lengths[0])
        save()
        result["decode"] = decode_rows(args.decode_lengths, 0.75, args.steps, args.decode_kinds)
        save()
    if "grid" in args.parts:
        result["needle"] = needle_grid_parallel(out, Path(args.needle_store or out / "grid"),
                                                args.needle_lengths, args.grid_depths,
                                                args.grid_ratios, args.needle_samples,
                                                args.grid_timeout)
        save()
    if "needle" in args.parts:
        result["needle"] = needle_grid(out, Path(args.needle_store or out / "needle"),
                                      args.needle_lengths, args.needle_samples, args.needle_query_mode)
        save()
    text = tables(result)
    (out / "gpu-bench.md").write_text(text)
    if args.fragment and not cuda and args.fragment == DEFAULT_FRAGMENT:
        print(f"(a CPU run: {DEFAULT_FRAGMENT} is the H200's fragment and was left alone; "
              "--fragment PATH writes one)")
    elif args.fragment:
        write_fragment(args.fragment, text)
    print(text)
    return 0


def run_render(args) -> int:
    """Re-render a stored gpu-bench.json (e.g. copied back from the GPU machine) as a fragment."""
    result = json.loads(Path(args.json).read_text())
    text = tables(result)
    if args.title:
        text = text.replace(text.splitlines()[0], f"### GPU: {args.title} ({result['date']})", 1)
    write_fragment(args.fragment, text)
    print(text)
    return 0


def add_parser(sub) -> None:
    r = sub.add_parser("gpu-render", help="markdown fragment from a stored gpu-bench.json")
    r.add_argument("json")
    r.add_argument("--fragment", required=True)
    r.add_argument("--title", default=None, help="heading instead of the parts' names")
    r.set_defaults(func=run_render)

    p = sub.add_parser("gpu", help="compression + decoding at Llama-3-8B scale on a CUDA GPU")
    p.add_argument("--parts", nargs="+", default=["compress", "decode", "needle"],
                   choices=["compress", "decode", "needle", "grid", "real-compress"],
                   help="real-compress: prefill compression on --model's real cache (also on the CPU)")
    p.add_argument("--model", default=None,
                   help="real-compress: as every command's --model (default: the embedded model)")
    p.add_argument("--real-lengths", type=int, nargs="+", default=list(DEFAULT_REAL_LENGTHS),
                   help="real-compress: prompt lengths (refused above the model's max_position_embeddings)")
    p.add_argument("--real-methods", nargs="+", default=list(REAL_METHODS), choices=REAL_METHODS)
    p.add_argument("--real-repeats", type=int, default=3, help="real-compress: timed calls per layer")
    p.add_argument("--no-l2-flush", dest="flush_l2", action="store_false",
                   help="real-compress: do not flush the L2 cache before each timed call")
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--layers", type=int, default=8, help="fresh-draw layers timed per length")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_GPU_METHODS),
                   help="compression methods (analysis.bench.compress.METHODS, iwdft-compiled)")
    p.add_argument("--decode-lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--steps", type=int, default=30, help="timed decode steps per cache")
    p.add_argument("--decode-kinds", nargs="+", default=list(DECODE_KINDS), choices=DECODE_KINDS,
                   help="caches to decode with (faedkv-attn: with faedkv's slot-scaling attention; "
                        "faedkv-torch: FAEDKVCache without kernels; *-plan: with a low-pass plan)")
    p.add_argument("--no-kernel-sweeps", dest="kernel_sweeps", action="store_false",
                   help="decode part: skip the per-layer kernel launch-shape sweeps and host overheads")
    p.add_argument("--needle-lengths", default="1024,2048,4096,8192")
    p.add_argument("--needle-samples", type=int, default=2)
    p.add_argument("--grid-depths", default="0,25,50,75,100")
    p.add_argument("--grid-ratios", default="0.5,0.75,0.875")
    p.add_argument("--grid-timeout", type=float, default=None,
                   help="seconds to wait for the grid's processes before merging what finished")
    p.add_argument("--needle-query-mode", default="query_agnostic",
                   choices=["query_agnostic", "query_aware"])
    p.add_argument("--needle-store", default=None, help="needle results store (default OUT/needle)")
    p.add_argument("--out", default="results/bench-gpu")
    p.add_argument("--fragment", default=DEFAULT_FRAGMENT,
                   help="markdown fragment for BENCHMARKS.md ('' for none)")
    p.set_defaults(func=run_gpu)
