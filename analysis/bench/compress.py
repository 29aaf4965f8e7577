"""`python -m analysis.bench compress`: per-layer prefill compression time of each FAEDKV variant
and of kvpress's SnapKVPress and StreamingLLMPress at the same budget, on a Llama-3-8B-shaped
cache (8 KV heads x 128 dims, bf16 random keys/values drawn fresh for every layer), as ratios
against SnapKV in the same run. SnapKV scores with the last window's queries, so a real
LlamaAttention layer (random weights, Llama-3-8B config) and random hidden states are built.
`compress_benchmark(...)` returns the rows and is reusable with device="cuda" (`bench gpu` does).
"""
from __future__ import annotations

import datetime
import statistics
import time

from analysis.bench.common import machine_description, write_fragment

METHODS = ("iwdft", "iwdft-torch", "iwdft-lowpass", "resample", "dct-iterative", "snapkv", "streamingllm")
# iwdft-lowpass: a plan keeping the lowest half of the bins in every layer (the FFT path; plain
# iwdft keeps every bin, where the inverse DFT undoes the forward one and no FFT runs).
# iwdft uses the fused Triton fold on CUDA (faedkv.fused); iwdft-torch is the same press on torch ops.
# iwdft-compiled: plain iwdft's press under torch.compile (fused fold), GPU benchmark only.


def llama3_layer(device: str, dtype):
    """A LlamaAttention layer with Llama-3-8B's shapes and random weights, plus its rotary."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, intermediate_size=14336, num_hidden_layers=32,
                         rope_theta=500000.0, max_position_embeddings=131072)
    with torch.device(device):
        module = LlamaAttention(config, layer_idx=0).to(dtype).eval()
        module.rotary_emb = LlamaRotaryEmbedding(config)
    return module, config


def make_press(method: str, ratio: float, sink: int, window: int, layers: int = 32):
    from kvpress import SnapKVPress, StreamingLLMPress

    from faedkv import FAEDKVPress, FrequencyPlan

    if method == "snapkv":
        return SnapKVPress(compression_ratio=ratio, window_size=window)
    if method == "streamingllm":
        return StreamingLLMPress(compression_ratio=ratio, n_sink=sink)
    if method == "iwdft-lowpass":
        return FAEDKVPress(compression_ratio=ratio, variant="iwdft", sink_tokens=sink, window=window,
                           plan=FrequencyPlan.low_pass(0.5, layers), record_errors=False)
    variant = "iwdft" if method in ("iwdft-compiled", "iwdft-torch") else method
    return FAEDKVPress(compression_ratio=ratio, variant=variant, sink_tokens=sink, window=window,
                       record_errors=False, fused=method == "iwdft")


def compress_call(method: str, press):
    """The press's compress, under torch.compile for iwdft-compiled (one compile per shape)."""
    import torch

    if method == "iwdft-compiled":
        return torch.compile(press.compress, dynamic=False)
    return press.compress


def compress_benchmark(lengths=(8192, 32768), layers: int = 32, repeats: int = 1,
                       device: str = "cpu", ratio: float = 0.75, sink: int = 4, window: int = 64,
                       methods=METHODS, progress: bool = True) -> list[dict]:
    """Median per-layer compression time (ms) per (length, method), fresh random draws per layer.

    Returns rows {"tokens", "method", "median_ms", "vs_snapkv", "cache_len", "samples", "host_ms",
    "kernel_ms"}: on CUDA median_ms is CUDA events around the call (the GPU's time from the call's
    start to its last kernel's end, so a host slower than the kernels shows in it), host_ms the
    median time the host took to return from the call, kernel_ms the GPU-busy time of a call under
    the profiler (`kernel_ms`); None off CUDA."""
    import torch
    from tqdm import tqdm

    dtype = torch.bfloat16
    module, config = llama3_layer(device, dtype)
    cuda = device.startswith("cuda")
    presses = {m: make_press(m, ratio, sink, window, config.num_hidden_layers) for m in methods}
    rows = []
    total = len(lengths) * len(methods) * layers * repeats
    bar = tqdm(total=total, desc="compress", disable=not progress)
    for tokens in lengths:
        positions = torch.arange(tokens, device=device)
        hidden_dummy = torch.zeros(1, tokens, 1, device=device, dtype=dtype)
        cos, sin = module.rotary_emb(hidden_dummy, positions.unsqueeze(0))
        kwargs = {"position_embeddings": (cos, sin), "cache_position": positions,
                  "position_ids": positions.unsqueeze(0)}
        timings = {m: [] for m in methods}
        host = {m: [] for m in methods}   # CUDA: the host's time to return from the call (launches, Python)
        lengths_out = {}
        calls = {m: compress_call(m, presses[m]) for m in methods}
        # Untimed warm-up (first-call allocations, kernels) on a short prefix: cheap even for
        # dct-iterative, whose cost grows with (tokens - slots) / window re-compressions; the
        # compiled press warms up at the timed shape (it compiles once per shape).
        short = min(tokens, 2048)
        for method in list(calls):
            n = tokens if method == "iwdft-compiled" else short
            warm = torch.randn(1, config.num_key_value_heads, n, config.head_dim, device=device, dtype=dtype)
            warm_kwargs = {"position_embeddings": (cos[:, :n], sin[:, :n]),
                           "cache_position": positions[:n], "position_ids": positions[None, :n]}
            try:
                with torch.no_grad():
                    for _ in range(2):
                        calls[method](module, torch.randn(1, n, config.hidden_size, device=device, dtype=dtype),
                                      warm, warm, None, warm_kwargs)
            except Exception as exc:  # torch.compile needs a working Triton; report, do not abort
                if method != "iwdft-compiled":
                    raise
                print(f"iwdft-compiled skipped at {tokens} tokens: {type(exc).__name__}: {exc}"[:400])
                del calls[method]
                bar.update(layers * repeats)
        for _ in range(repeats):
            for layer in range(layers):
                shape = (1, config.num_key_value_heads, tokens, config.head_dim)
                keys = torch.randn(shape, device=device, dtype=dtype)
                values = torch.randn(shape, device=device, dtype=dtype)
                hidden = torch.randn(1, tokens, config.hidden_size, device=device, dtype=dtype)
                module.layer_idx = layer
                for method in calls:
                    with torch.no_grad():
                        if cuda:
                            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                            launched = time.perf_counter()
                            start.record()
                            out_keys, _ = calls[method](module, hidden, keys, values, None, kwargs)
                            end.record()
                            host[method].append((time.perf_counter() - launched) * 1000)
                            end.synchronize()
                            timings[method].append(start.elapsed_time(end))
                        else:
                            start = time.perf_counter()
                            out_keys, _ = calls[method](module, hidden, keys, values, None, kwargs)
                            timings[method].append((time.perf_counter() - start) * 1000)
                    lengths_out[method] = out_keys.shape[2]
                    bar.update(1)
        snap = statistics.median(timings["snapkv"]) if "snapkv" in timings else None
        for method in calls:
            median = statistics.median(timings[method])
            rows.append({"tokens": tokens, "method": method, "median_ms": median,
                         "vs_snapkv": median / snap if snap else None,
                         "cache_len": lengths_out[method], "samples": len(timings[method]),
                         "host_ms": statistics.median(host[method]) if cuda else None,
                         "kernel_ms": (kernel_ms(calls[method], module, hidden, keys, values, kwargs)
                                       if cuda else None),
                         "host_functions": (host_functions(calls[method], module, hidden, keys, values, kwargs)
                                            if cuda else None)})
    bar.close()
    return rows


def kernel_ms(call, module, hidden, keys, values, kwargs, calls: int = 3) -> float:
    """GPU-busy ms of one compress call on CUDA: the device operations' durations (kernels,
    memcpy, memset) under torch.profiler, summed over `calls` calls and divided by them. With the
    events' median and the host's time it separates the GPU's work from host-bound launching."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from analysis.bench.e2e import is_device_op

    cuda = torch.cuda.is_available()
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]
                                  + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(calls):
            call(module, hidden, keys, values, None, kwargs)
        if cuda:
            torch.cuda.synchronize()
    # kineto's events (methods device_type(), duration_ns()), the kind is_device_op reads, not
    # prof.events()'s FunctionEvents (attributes): the mix-up failed on the H200 in round 7
    events = prof.profiler.kineto_results.events()
    return sum(e.duration_ns() for e in events if is_device_op(e)) / 1e6 / calls


def host_functions(call, module, hidden, keys, values, kwargs, calls: int = 20, most: int = 6) -> list[tuple[str, float]]:
    """Where the host's time in a compress call goes: the `most` functions with the largest own
    time under cProfile over `calls` calls, as ("file:line(function)", ms per call). A call whose
    host time is far above its GPU-busy time (`kernel_ms`) is bound by these."""
    import cProfile
    import os
    import pstats

    import torch

    profiler = cProfile.Profile()
    with torch.no_grad():
        profiler.enable()
        for _ in range(calls):
            call(module, hidden, keys, values, None, kwargs)
        profiler.disable()
    stats = pstats.Stats(profiler).stats   # {(file, line, name): (calls, primitive calls, own s, cumulative s, callers)}
    ranked = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:most]
    return [(f"{os.path.basename(file)}:{line}({name})", own * 1000 / calls) for (file, line, name), (_, _, own, _, _)
            in ranked]


def compress_table(rows: list[dict], device: str, layers: int, repeats: int) -> str:
    lines = [f"### Prefill compression per layer ({datetime.date.today().isoformat()}, {device})",
             "", f"Machine: {machine_description(device)}.",
             f"Llama-3-8B-shaped cache (8 KV heads x 128 dims, bf16, batch 1), ratio 0.75, sink 4, "
             f"window 64; median over {layers} layers x {repeats} repeats (fresh random draws).", "",
             "| tokens | method | cache rows | median ms / layer | x SnapKV |",
             "|---:|---|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['vs_snapkv']:.2f}" if r["vs_snapkv"] is not None else "-"
        lines.append(f"| {r['tokens']} | {r['method']} | {r['cache_len']} | {r['median_ms']:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def run_compress(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = compress_benchmark(args.lengths, args.layers, args.repeats, args.device,
                              methods=args.methods)
    table = compress_table(rows, args.device, args.layers, args.repeats)
    command = ("python -m analysis.bench compress --lengths " + " ".join(map(str, args.lengths))
               + f" --layers {args.layers} --repeats {args.repeats} --device {args.device}")
    table = table.replace("\n\n", f"\n\nCommand: `{command}`\n\n", 1)
    print(table)
    if args.out:
        write_fragment(args.out, table)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("compress", help="per-layer prefill compression time vs SnapKV")
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--layers", type=int, default=32, help="layers (fresh draws) per length")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + ("iwdft-compiled",))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="benchmarks/compress-cpu.md",
                   help="markdown fragment to write ('' for none)")
    p.set_defaults(func=run_compress)
