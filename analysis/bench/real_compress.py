"""`python -m analysis.bench gpu --parts real-compress --model M`: per-layer prefill compression
of a real model's own cache (issue 18's second half; the first is the Llama-3-8B-shaped random
cache of `gpu --parts compress`).

For each length: one prefill of essay text (`haystack.text_tokens`) through the model with a full
DynamicCache, capturing for every layer what kvpress's `BasePress.forward_hook` hands `compress`:
the layer's keys and values (from the cache, after the prefill), its input hidden states and the
attention call's keyword arguments (position embeddings, cache position, position ids, ...; by a
forward pre-hook on each `self_attn`). Then, layer by layer, each press's
`compress(module, hidden_states, keys, values, None, kwargs)` is timed on those tensors (CUDA
events, the L2 cache flushed before each call; perf_counter on the CPU): per layer the median of
`repeats` calls after two untimed warm-up calls at layer 0, then the median over layers.

floor = bytes that must move / copy bandwidth measured in the same run: read K and V once and
write the kept rows (the real KV heads, head_dim and dtype; for dimsplit, which keeps every row
virtually, the rows' worth of numbers it stores: `last_stats[layer]["equivalent_rows"]`).
Peak = the allocator's peak during the call minus what was allocated before it (the output
included), the largest over layers; CUDA only.

The captured hidden states stay on the device (L x T x hidden numbers); when they would take more
than a quarter of the free GPU memory they are kept on the host and copied to the device one
layer at a time, before that layer's (untimed) turn.
"""
from __future__ import annotations

import statistics
import time

from analysis.harness.capture import decoder_layers

REAL_METHODS = ("faedkv", "faedkv-dimsplit", "faedkv-hybrid", "snapkv", "keydiff", "streamingllm")
DEFAULT_REAL_LENGTHS = (4096, 8192, 16384, 32768)
RATIO = 0.75
SNAPKV_WINDOW = 64
FAEDKV_METHODS = ("faedkv", "faedkv-dimsplit", "faedkv-hybrid")
# what each row's press is, for the table
METHOD_NOTES = {
    "faedkv": "FAEDKVPress(compression_ratio=0.75, variant='iwdft', record_errors=False): iwdft class means (fused Triton fold on CUDA)",
    "faedkv-dimsplit": "FAEDKVPress(variant='dimsplit', dim_share=0.5, exact_share=0): every row kept virtually; floor with its stored bytes",
    "faedkv-hybrid": "FAEDKVPress(variant='iwdft', exact_share=0.9, exact_scorer='keydiff'): 90% of the middle budget exact (KeyDiff's top tokens)",
    "snapkv": "kvpress SnapKVPress(compression_ratio=0.75, window_size=64): scores with the last 64 queries",
    "keydiff": "kvpress KeyDiffPress(compression_ratio=0.75)",
    "streamingllm": "kvpress StreamingLLMPress(compression_ratio=0.75, n_sink=4)",
}
# dropped from the captured attention kwargs: the hidden states are passed on their own (and put
# back at the call), a materialised mask would hold T x T numbers and none of these presses reads it
DROPPED_KWARGS = ("hidden_states", "attention_mask")
HOST_SHARE = 0.25   # hidden states above this share of the free GPU memory stay on the host


def real_press(method: str, ratio: float = RATIO):
    """The press of a row of this benchmark."""
    from kvpress import KeyDiffPress, SnapKVPress, StreamingLLMPress

    from faedkv import FAEDKVPress

    if method == "faedkv":
        return FAEDKVPress(compression_ratio=ratio, variant="iwdft", record_errors=False)
    if method == "faedkv-dimsplit":
        return FAEDKVPress(compression_ratio=ratio, variant="dimsplit", dim_share=0.5, exact_share=0.0, window_share=0.0,
                           record_errors=False)
    if method == "faedkv-hybrid":
        return FAEDKVPress(compression_ratio=ratio, variant="iwdft", exact_share=0.9, exact_scorer="keydiff",
                           record_errors=False)
    if method == "snapkv":
        return SnapKVPress(compression_ratio=ratio, window_size=SNAPKV_WINDOW)
    if method == "keydiff":
        return KeyDiffPress(compression_ratio=ratio)
    if method == "streamingllm":
        return StreamingLLMPress(compression_ratio=ratio, n_sink=4)
    raise ValueError(f"unknown method {method!r}; use one of {', '.join(REAL_METHODS)}")


def max_positions(loaded) -> int | None:
    """The most positions the model takes: its config's max_position_embeddings (a GGUF's
    context length when that is smaller)."""
    limits = [getattr(loaded.model.config, "max_position_embeddings", None),
              getattr(getattr(loaded, "info", None), "context_length", None)]
    limits = [int(n) for n in limits if n]
    return min(limits) if limits else None


def check_lengths(lengths, loaded) -> None:
    """ValueError naming the lengths the model cannot take (above its positions, or too short
    for SnapKV's window)."""
    lengths = list(lengths)
    if not lengths:
        raise ValueError("--real-lengths is empty: give at least one prompt length")
    limit = max_positions(loaded)
    name = getattr(getattr(loaded, "info", None), "name", type(loaded.model).__name__)
    over = [n for n in lengths if limit is not None and n > limit]
    if over:
        raise ValueError(f"--real-lengths {' '.join(map(str, over))} above {name}'s {limit} positions "
                         f"(max_position_embeddings): the real cache is only measured at lengths the "
                         f"model takes; drop them or pick a model with a longer context")
    short = [n for n in lengths if n <= 2 * SNAPKV_WINDOW]
    if short:
        raise ValueError(f"--real-lengths {' '.join(map(str, short))} too short: SnapKV scores with "
                         f"the last {SNAPKV_WINDOW} queries, give lengths above {2 * SNAPKV_WINDOW}")


def hidden_on_host(model, tokens: int) -> bool:
    """Whether the captured hidden states (every layer's T x hidden) should stay on the host."""
    import torch

    device = model.device
    if device.type != "cuda":
        return False
    config = model.config.get_text_config()
    needed = config.num_hidden_layers * tokens * config.hidden_size * model.dtype.itemsize
    free, _ = torch.cuda.mem_get_info(device)
    return needed > HOST_SHARE * free


class Captured:
    """One prefill's per-layer inputs of `compress`: keys, values (the DynamicCache's), hidden
    states (on the device, or on the host when `host`) and the attention call's kwargs."""

    def __init__(self, keys, values, hidden, kwargs, host: bool):
        self.keys, self.values, self.hidden, self.kwargs, self.host = keys, values, hidden, kwargs, host

    def hidden_states(self, layer: int, device):
        return self.hidden[layer].to(device) if self.host else self.hidden[layer]

    def call_kwargs(self, layer: int, hidden):
        """The kwargs kvpress's forward_hook would pass compress (hidden_states included)."""
        return {**self.kwargs[layer], "hidden_states": hidden}


def capture_prefill(model, ids, host: bool = False) -> Captured:
    """One prefill of ids with a full DynamicCache; a forward pre-hook on every self_attn keeps
    its input hidden states and keyword arguments. The LM head is not run (model.model)."""
    import torch
    from transformers import DynamicCache

    layers = decoder_layers(model)
    hidden, kwargs = [None] * len(layers), [None] * len(layers)

    def pre_hook(module, args, call_kwargs):
        states = call_kwargs["hidden_states"] if "hidden_states" in call_kwargs else args[0]
        hidden[module.layer_idx] = states.to("cpu") if host else states
        kwargs[module.layer_idx] = {k: v for k, v in call_kwargs.items() if k not in DROPPED_KWARGS}

    hooks = [layer.self_attn.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in layers]
    cache = DynamicCache()
    try:
        with torch.inference_mode():
            model.model(input_ids=ids, past_key_values=cache, use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
    missing = [i for i, h in enumerate(hidden) if h is None]
    if missing:
        raise RuntimeError(f"the prefill did not call self_attn of layers {missing}")
    keys = [cache.layers[i].keys for i in range(len(layers))]
    values = [cache.layers[i].values for i in range(len(layers))]
    return Captured(keys, values, hidden, kwargs, host)


def copy_bandwidth_host(mib: int = 256, repeats: int = 5) -> float:
    """Host memory copy bandwidth in bytes/s (read + write), perf_counter: the CPU's floor."""
    import torch

    src = torch.randint(0, 255, (mib * 2**20,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        seconds.append(time.perf_counter() - start)
    return 2 * src.numel() / statistics.median(seconds)


class Timer:
    """Times one call: CUDA events around it (the L2 cache flushed before, the allocator's peak
    over the call measured) or perf_counter on the CPU."""

    def __init__(self, device, flush_l2: bool = True):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.flush = (torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
                      if self.cuda and flush_l2 else None)

    def __call__(self, fn):
        """(fn's result, ms, peak extra bytes or None)."""
        import torch

        if not self.cuda:
            start = time.perf_counter()
            out = fn()
            return out, (time.perf_counter() - start) * 1e3, None
        if self.flush is not None:
            self.flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return out, start.elapsed_time(end), torch.cuda.max_memory_allocated() - before


def floor_bytes(row_bytes: int, tokens: int, stored_rows: float) -> float:
    """The bytes a layer's compression must move: read K and V once (`tokens` rows of each) and
    write `stored_rows` rows of each; a row is batch x KV heads x head_dim numbers."""
    return 2 * row_bytes * (tokens + stored_rows)


def row_bytes(keys) -> int:
    """Bytes of one row of keys (batch, kv_heads, tokens, head_dim) across batch and heads."""
    batch, heads, _, dim = keys.shape
    return batch * heads * dim * keys.element_size()


def model_summary(loaded) -> dict:
    config = loaded.model.config.get_text_config()
    info = loaded.info
    return {"name": info.name, "source": info.source, "revision": info.revision,
            "layers": config.num_hidden_layers, "kv_heads": config.num_key_value_heads,
            "heads": config.num_attention_heads, "head_dim": info.head_dim,
            "hidden_size": config.hidden_size, "dtype": str(loaded.model.dtype).replace("torch.", ""),
            "max_positions": max_positions(loaded), "device": str(loaded.model.device)}


def real_compress_rows(loaded, lengths=DEFAULT_REAL_LENGTHS, bandwidth: float | None = None,
                       methods=REAL_METHODS, repeats: int = 3, ratio: float = RATIO,
                       flush_l2: bool = True, host: bool | None = None, progress: bool = True,
                       on_length=None) -> list[dict]:
    """One row per (length, method) on `loaded`'s real cache (see the module's docstring).

    bandwidth: bytes/s of the floor (None: the host's copy bandwidth, measured now); host: keep
    the captured hidden states on the host (None: when they would crowd the GPU);
    on_length(rows so far) after each length. ValueError for lengths the model cannot take."""
    import torch
    from kvpress.utils import compute_n_kept
    from tqdm import tqdm

    from analysis.harness.haystack import text_tokens
    from faedkv.attention import BIAS_ATTR

    check_lengths(lengths, loaded)
    unknown = [m for m in methods if m not in REAL_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; use {', '.join(REAL_METHODS)}")
    if bandwidth is None:
        bandwidth = copy_bandwidth_host()
    model, device = loaded.model, loaded.model.device
    layers = decoder_layers(model)
    modules = [layer.self_attn for layer in layers]
    had_bias = [hasattr(m, BIAS_ATTR) for m in modules]
    timer = Timer(device, flush_l2)
    rows: list[dict] = []
    bar = tqdm(total=len(lengths) * len(layers) * len(methods), desc="real-compress", disable=not progress)
    try:
        for tokens in lengths:
            ids = torch.tensor([text_tokens(loaded.tokenizer, tokens)], device=device)
            on_host = hidden_on_host(model, tokens) if host is None else host
            captured = capture_prefill(model, ids, on_host)
            presses = {m: real_press(m, ratio) for m in methods}
            per_layer = {m: [] for m in methods}
            peaks = {m: [] for m in methods}
            cache_len = {m: set() for m in methods}
            stored = {m: [] for m in methods}
            fused_used = {m: set() for m in methods}
            with torch.inference_mode():
                for index, module in enumerate(modules):
                    hidden = captured.hidden_states(index, device)
                    kwargs = captured.call_kwargs(index, hidden)
                    keys, values = captured.keys[index], captured.values[index]
                    for method in methods:
                        press = presses[method]

                        def call():
                            return press.compress(module, hidden, keys, values, None, kwargs)

                        if index == 0:   # first calls: allocations, Triton's compile
                            for _ in range(2):
                                call()
                        times, layer_peaks = [], []
                        for _ in range(repeats):
                            (out_keys, out_values), ms, peak = timer(call)
                            times.append(ms)
                            layer_peaks.append(peak)
                        per_layer[method].append(statistics.median(times))
                        if layer_peaks[0] is not None:
                            peaks[method].append(max(layer_peaks))
                        cache_len[method].add(out_keys.shape[2])
                        if method in FAEDKV_METHODS:
                            fused_used[method].add(bool(press.fusable(keys, values)))
                            stored[method].append(press.last_stats[module.layer_idx]["equivalent_rows"]
                                                  if method == "faedkv-dimsplit" else out_keys.shape[2])
                        else:
                            stored[method].append(out_keys.shape[2])
                        del out_keys, out_values
                        bar.update(1)
                    del hidden, kwargs
            keys0 = captured.keys[0]
            length_rows = []
            for method in methods:
                stored_rows = max(stored[method])
                floor_ms = 1e3 * floor_bytes(row_bytes(keys0), keys0.shape[2], stored_rows) / bandwidth
                median = statistics.median(per_layer[method])
                length_rows.append({
                    "tokens": tokens, "method": method, "ratio": ratio,
                    "cache_len": max(cache_len[method]), "cache_lens": sorted(cache_len[method]),
                    "budget_rows": compute_n_kept(tokens, ratio), "stored_rows": stored_rows,
                    "median_ms": median, "total_ms": sum(per_layer[method]),
                    "min_layer_ms": min(per_layer[method]), "max_layer_ms": max(per_layer[method]),
                    "floor_ms": floor_ms, "vs_floor": median / floor_ms,
                    "peak_extra_bytes": max(peaks[method]) if peaks[method] else None,
                    "fused_used": (all(fused_used[method]) if fused_used[method] else None),
                    "layers": len(modules), "repeats": repeats, "kv_heads": keys0.shape[1],
                    "head_dim": keys0.shape[3], "dtype": str(keys0.dtype).replace("torch.", ""),
                    "hidden_on_host": on_host})
            snap = next((r["median_ms"] for r in length_rows if r["method"] == "snapkv"), None)
            for r in length_rows:
                r["vs_snapkv"] = r["median_ms"] / snap if snap else None
            rows += length_rows
            del captured, ids, presses
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if on_length is not None:
                on_length(rows)
    finally:
        bar.close()
        for module, had in zip(modules, had_bias):   # FAEDKV's presses noted slot biases on them
            if not had and hasattr(module, BIAS_ATTR):
                delattr(module, BIAS_ATTR)
    return rows


def real_compress_markdown(rows: list[dict], model: dict, flush_l2: bool | None = True) -> str:
    """The part's table for `gpu.tables` (model: `model_summary`)."""
    if not rows:
        return ""
    cuda = model.get("device", "").startswith("cuda")
    timer = ("CUDA events around the press's compress call (Python included)"
             + (", the L2 cache flushed before each" if flush_l2 else "")) if cuda else "perf_counter"
    layers = model["layers"]
    lines = ["", f"Prefill compression of **{model['name']}**'s real cache ({layers} layers x "
             f"{model['kv_heads']} KV heads x {model['head_dim']} dims, {model['dtype']}, "
             f"{model['heads']} query heads), ratio {rows[0]['ratio']:g}: one prefill of essay text "
             "per length with a full DynamicCache; every layer's own K/V, input hidden states and "
             "attention kwargs (forward pre-hook on self_attn) handed to each press's "
             f"compress; per layer the median of {rows[0]['repeats']} calls ({timer}), then the "
             "median over layers. floor = (read K,V once + write the kept rows; dimsplit: the rows' "
             "worth of numbers it stores) / bandwidth. peak = the largest extra allocation during "
             "one call (output included).", "",
             f"| tokens | method | cache rows | stored rows | median ms / layer | ms for {layers} layers "
             "| floor ms | x floor | x SnapKV | peak extra MB | fused |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        snap = f"{r['vs_snapkv']:.2f}" if r["vs_snapkv"] is not None else "-"
        peak = f"{r['peak_extra_bytes'] / 2**20:.1f}" if r["peak_extra_bytes"] is not None else "-"
        fused = "-" if r["fused_used"] is None else ("yes" if r["fused_used"] else "no")
        stored = f"{r['stored_rows']:.1f}" if r["stored_rows"] != int(r["stored_rows"]) else f"{int(r['stored_rows'])}"
        lines.append(f"| {r['tokens']} | {r['method']} | {r['cache_len']} | {stored} | {r['median_ms']:.3f} | "
                     f"{r['total_ms']:.2f} | {r['floor_ms']:.4f} | {r['vs_floor']:.2f} | {snap} | {peak} | {fused} |")
    lines.append("")
    lines += [f"- {m}: {METHOD_NOTES[m]}" for m in REAL_METHODS if any(r["method"] == m for r in rows)]
    default = [r for r in rows if r["method"] == "faedkv"]
    if default and any(r["vs_snapkv"] is not None for r in default):
        within = ", ".join(f"{r['tokens']}: {r['vs_floor']:.2f}x floor, {r['vs_snapkv']:.2f}x SnapKV"
                           for r in default if r["vs_snapkv"] is not None)
        at_most = all(r["vs_snapkv"] <= 1 for r in default if r["vs_snapkv"] is not None)
        lines += ["", f"Shipped default (faedkv) against issue 18's bars (within 2x of the floor at 32K "
                  f"and 128K, at most SnapKV's time at every length): {within}; at most SnapKV's "
                  f"time at every length measured: {'yes' if at_most else 'no'}."]
    if any(r.get("hidden_on_host") for r in rows):
        lines.append("\nThe captured hidden states were kept on the host and copied to the device one "
                     "layer at a time (untimed).")
    return "\n".join(lines)
