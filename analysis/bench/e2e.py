"""End to end on a real model: time to first token, ms per new token and peak memory of
`model.generate` for the full cache, kvpress presses and FAEDKV (as a press, as FAEDKVCache
with a fixed budget while decoding, as StaticFAEDKVCache: the same decoded by a compiled step, and
as DimsplitCache: the dimension split stored physically, alone or behind KVzip's ranking).

    python -m analysis.bench e2e --model /tmp/m/model --device cuda --lengths 16384 32768 \\
        --new-tokens 256 --ratio 0.75 --fragment benchmarks/e2e-h200-qwen.md

Both times come from one generate call of N new tokens, clocked by a streamer that notes when each
new token reaches the host (generate hands it over with `.cpu()`, so on CUDA the token is
computed): time to first token = the first new token's time since the call began (prefill +
compression + one step); ms per token = (last token's time - first token's) / (N - 1). Each is the
median of `--repeats` calls on the same prompt (essay text), after one warm-up call. (Two calls
of 1 and N tokens, subtracted, went negative when a press's prefill varies by more than the
decode takes: KVzip's does.) Peak memory (CUDA only) is the allocator's peak during the call
minus what was allocated before the row's warm-up (the weights and the input). Greedy decoding with
min_new_tokens = max_new_tokens, so every row decodes the same count. Every row starts on the
model's sdpa (a FAEDKV row switches the config to faedkv_sdpa or faedkv_static_sdpa; the next
row switches it back).

The STATIC_ROWS decode through transformers' own compiled path: the one-token decode forward
under torch.compile(mode="reduce-overhead") (CUDA graphs), the prefill eagerly. full-static is
the full cache, `generate(cache_implementation="static", compile_config=CompileConfig())`, i.e.
a StaticCache of prompt + new tokens rows; faedkv-cache-static is faedkv-cache's budget and math
as a fixed-shape decode step, `generate(past_key_values=StaticFAEDKVCache(...),
compile_config=CompileConfig())` (faedkv.decode.static), which generate compiles the same way
because the cache is `is_compileable`. transformers compiles only on CUDA/XPU, so on CPU these
rows run without compilation (the row says which), unless --compile-cpu sets transformers' own
switch to compile on every device (inductor on the CPU: no CUDA graphs, but one fused graph per
step instead of Python dispatch). Their warm-up decodes as many tokens as the
timed calls (a shorter one would size a smaller StaticCache and the timed call would compile
again), so compilation is excluded from the times and reported as the warm-up's seconds. The
cache a static row allocates at the warm-up persists between its calls (full-static: generate
keeps it as `model._cache`; faedkv-cache-static: the row keeps one StaticFAEDKVCache and resets it
before each call, so its buffers keep their addresses and the compiled step and its CUDA graphs
are reused), hence the peak over what was allocated before the warm-up (it counts that cache),
for every row. A static row starts and ends with `release_static_path`: its own cache and
compilation, as in a fresh process. DimsplitCache cannot run under that path (NOT_STATIC says
why; dimsplit-cache-static is refused).

--profile: after the timed calls, one more call of N new tokens under torch.profiler (CPU
activity, plus CUDA on a CUDA model), the streamer marking each token with a record_function
range. At each mark the token has reached the host, so every device operation launched before
it has finished: device operations (kernels, memcpy, memset: CUDA events that are not annotation
ranges, the events torch's own device-time total sums) that start before the first token's mark
are the first token's; those that start between the first and the last token's marks are the
decode's, the window ms per token is clocked over. GPU ms / token = the sum of their durations /
(N - 1): a sum, not the union, which equals busy time on one stream (generate uses one).
host-bound share = 1 - GPU ms / token / the row's median ms / token: the wall time comes from the
unprofiled calls, since the profiler slows the host, not the kernels. Off CUDA these are "-".
"""
from __future__ import annotations

import statistics
import time

from analysis.bench.common import machine_description, write_fragment

KVZIP_SPLIT = "kvzip-split-cache"                     # DimsplitCache behind KVzip's global ranking
DEFAULT_ROW = KVZIP_SPLIT + ":window_share=0.5"       # FAEDKVPress()'s configuration, stored physically
ROWS = ("full", "snapkv", DEFAULT_ROW, "faedkv-cache")   # the default rows; any --methods spec is a row too
# kvzip-split-cache:window=512 (a recent window of 512), :window_share=0.5 (half the kept rows): DimsplitCache options
SPLIT_OPTIONS = {"window": int, "window_share": float}
CACHE_ROWS = ("faedkv-cache", "dimsplit-cache", KVZIP_SPLIT)   # rows whose cache compresses itself (no press)
STATIC_ROWS = ("full-static", "faedkv-cache-static")  # static caches, decode step compiled (on CUDA)
MARK = "e2e.token"                                    # the profiled call's record_function per token
NOT_STATIC = ("DimsplitCache cannot run under transformers' compiled static-cache path: its exact rows grow by one "
              "each token (a shape that changes every step), its layers keep Python-side state that changes every "
              "token (tokens seen) and hand attention their store through a Python registry "
              "(faedkv.decode.slots.post), so a CUDA graph would replay the first step's values; and transformers "
              "compiles only caches whose layers are is_compileable (DimsplitCache's are not), so it would run it "
              "eagerly. FAEDKVCache's static form is StaticFAEDKVCache (faedkv-cache-static)")


def static_refusal(row: str) -> str:
    """Why a "<row>-static" other than the STATIC_ROWS is not timed."""
    if row[:-len("-static")] in CACHE_ROWS:
        return f"{NOT_STATIC}; only {' and '.join(STATIC_ROWS)} are timed this way"
    return (f"only {' and '.join(STATIC_ROWS)} run through transformers' static-cache path: a press shortens "
            "the cache after the prefill, and a StaticCache keeps a fixed length")


def kvzip_split_options(row: str) -> dict | None:
    """The DimsplitCache options of a kvzip-split-cache row: {} (the cache's defaults), or
    {"window": 512, "window_share": 0.5} for "kvzip-split-cache:window=512:window_share=0.5"; None
    for any other row. ValueError for an unknown option, or a value the cache would refuse (a
    window that is not a whole number >= 0, a window_share outside [0, 1): faedkv.budget's rule)."""
    from faedkv.budget import asked_window

    if row != KVZIP_SPLIT and not row.startswith(KVZIP_SPLIT + ":"):
        return None
    wanted = {"window": f"a whole number >= 0 (e.g. {KVZIP_SPLIT}:window=512)",
              "window_share": f"a number in [0, 1) (the kept rows' share in the recent window, e.g. "
                              f"{KVZIP_SPLIT}:window_share=0.5)"}
    options = {}
    for item in row.split(":")[1:]:
        name, _, text = item.partition("=")
        if name not in SPLIT_OPTIONS:
            raise ValueError(f"{KVZIP_SPLIT} takes {' and '.join(SPLIT_OPTIONS)} (e.g. {KVZIP_SPLIT}:window=512 or "
                             f"{KVZIP_SPLIT}:window_share=0.5), got {item!r}")
        try:
            options[name] = SPLIT_OPTIONS[name](text)
            asked_window(0, options.get("window", 0), options.get("window_share", 0.0))
            if options.get("window", 0) < 0:
                raise ValueError(name)
        except ValueError:
            raise ValueError(f"the {name} of {KVZIP_SPLIT} must be {wanted[name]}, got {text!r}") from None
    return options


def row_cache(row: str, ratio: float):
    """The cache a row generates with: FAEDKVCache, StaticFAEDKVCache, DimsplitCache (dim_share
    0.5; all with the press's default sink and window) or a DynamicCache."""
    from transformers import DynamicCache

    from faedkv import DimsplitCache, FAEDKVCache, StaticFAEDKVCache

    if row == "faedkv-cache":
        return FAEDKVCache(compression_ratio=ratio)
    if row == "faedkv-cache-static":
        return StaticFAEDKVCache(compression_ratio=ratio)
    if row == "dimsplit-cache":
        return DimsplitCache(compression_ratio=ratio, dim_share=0.5)
    return DynamicCache()


def kvzip_split_cache(model, context_ids, ratio: float, **options):
    """The search's best configuration stored physically: KVzip's scoring passes over the context
    (`faedkv.kvzip.kvzip_prefill`), then a DimsplitCache keeping 90% of each layer's middle budget
    as whole tokens ranked by KVzip over every layer and head (exact_pool "global") and the
    dimension split (dim_share 0.5) of the rest, filled from the scored prefill with no further
    model call (`prefill_from`); `options` (e.g. window) go to the DimsplitCache."""
    from faedkv import DimsplitCache
    from faedkv.kvzip import kvzip_prefill

    prefilled, scores = kvzip_prefill(model, context_ids)
    cache = DimsplitCache(compression_ratio=ratio, dim_share=0.5, exact_share=0.9, exact_scores=scores,
                          exact_pool="global", **options)
    cache.prefill_from(model, prefilled)
    return cache


def row_generate_kwargs(row: str, ratio: float, cache=None, compile_cpu: bool = False) -> dict:
    """What selects a row's cache in model.generate: for full-static transformers' static cache,
    else the row's cache object (`cache`, or a fresh `row_cache`); for the STATIC_ROWS with
    generate's compiled decode step (CompileConfig's defaults: mode "reduce-overhead", fullgraph False).
    compile_cpu: compile it on any device (transformers' own switch; by default it compiles only on
    CUDA/XPU), so a CPU run times the compiled step too (inductor; no CUDA graphs there)."""
    from transformers import CompileConfig

    config = CompileConfig()
    config._compile_all_devices = compile_cpu
    if row == "full-static":
        return {"cache_implementation": "static", "compile_config": config}
    kwargs = {"past_key_values": cache if cache is not None else row_cache(row, ratio)}
    if row in STATIC_ROWS:
        kwargs["compile_config"] = config
    return kwargs


def row_spec(row: str, ratio: float):
    """The MethodSpec of a row (None for the CACHE_ROWS and STATIC_ROWS); ValueError for what this
    bench cannot time. KVzip scores when its `with` block ends, and model.generate decodes inside
    the block, so its rows (and FAEDKV hybrids scored by KVzip) would decode over the full cache."""
    from analysis.cli import parse_methods
    from analysis.harness.methods import method_params

    if row in CACHE_ROWS or row in STATIC_ROWS or kvzip_split_options(row) is not None:
        return None
    if row.endswith("-static"):
        raise ValueError(static_refusal(row))
    specs = parse_methods(row, [ratio])
    if len(specs) != 1:
        raise ValueError("one method per row")
    spec = specs[0]
    params = method_params(spec) if spec.name == "faedkv" else {}
    if spec.name == "kvzip" or (params.get("exact_scorer") == "kvzip" and params.get("exact_share")):
        raise ValueError("KVzip compresses when its `with` block ends, after model.generate has "
                         "decoded on the full cache; time it with kvpress's pipeline (prefill under "
                         f"the press, then decode), not here, or its physical store as row {KVZIP_SPLIT}")
    return spec


def row_press(row: str, ratio: float, model):
    """The press of a row: None for "full" and the CACHE_ROWS and STATIC_ROWS (their caches
    compress themselves or not at all), else the registry press of the method spec `row` (e.g.
    "faedkv:exact_share=0.9") at `ratio`."""
    from analysis.harness.methods import build_press

    spec = row_spec(row, ratio)
    return None if spec is None or spec.name == "full" else build_press(spec, model)


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def allocated_bytes(device: str) -> int | None:
    """Bytes the CUDA allocator holds now (None off CUDA)."""
    import torch

    return torch.cuda.memory_allocated() if device.startswith("cuda") else None


def release_static_path(model) -> None:
    """Release the StaticCache generate keeps on the model between calls (`model._cache`), its
    compiled forward (`model._compiled_call`) and what torch.compile built (`torch.compiler.reset()`:
    dynamo's caches and the CUDA graph trees), so that a static row allocates, compiles and is
    measured on its own, as in a fresh process (a second prompt length would otherwise recompile
    with dynamic shapes)."""
    import torch

    for name in ("_cache", "_compiled_call"):   # generate's StaticCache; get_compiled_call's wrapper
        if hasattr(model, name):
            delattr(model, name)
    torch.compiler.reset()


class TokenClock:
    """A generate streamer that notes the time of each `put`: the prompt first, then every new
    token (ids arrive on the host, so the step that made them is done). mark: also open and close
    a record_function range named MARK, for a profiler to place the tokens on its clock."""

    def __init__(self, mark: bool = False):
        self.times: list[float] = []
        self.mark = mark

    def put(self, value) -> None:
        self.times.append(time.perf_counter())
        if self.mark:
            from torch.profiler import record_function

            with record_function(MARK):
                pass

    def end(self) -> None:
        pass


def generate_seconds(loaded, ids, row: str, ratio: float, new_tokens: int, start_bytes: int | None = None,
                     clock: TokenClock | None = None, cache=None, compile_cpu: bool = False) -> dict:
    """One generate call: {"total_s", "ttft_s", "ms_per_token" (None for one new token),
    "peak_bytes" (the call's peak over `start_bytes`, default what is allocated when it starts;
    None off CUDA)}. cache: a cache the row keeps for all its calls (reset here), else the row's
    generate kwargs bring a fresh one; compile_cpu as row_generate_kwargs takes it."""
    import torch

    model, device = loaded.model, str(loaded.model.device)
    press = row_press(row, ratio, model)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        start_bytes = torch.cuda.memory_allocated() if start_bytes is None else start_bytes
    clock = clock or TokenClock()
    if cache is not None:
        cache.reset()
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        options = kvzip_split_options(row)
        if options is not None:   # scored and stored before generate feeds the last prompt token: first token's time
            cache = kvzip_split_cache(model, ids[:, :-1], ratio, **options)
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      pad_token_id=loaded.tokenizer.eos_token_id, streamer=clock,
                      **row_generate_kwargs(row, ratio, cache, compile_cpu))
        if press is None:
            model.generate(ids, **kwargs)
        else:
            with press(model):
                model.generate(ids, **kwargs)
    synchronize(device)
    seconds = time.perf_counter() - start
    tokens = clock.times[1:]                   # the first put is the prompt
    if len(tokens) != new_tokens:
        raise RuntimeError(f"row {row!r}: generate streamed {len(tokens)} new tokens, asked for {new_tokens}")
    return {"total_s": seconds, "ttft_s": tokens[0] - start,
            "ms_per_token": 1e3 * (tokens[-1] - tokens[0]) / (new_tokens - 1) if new_tokens > 1 else None,
            "peak_bytes": torch.cuda.max_memory_allocated() - start_bytes if cuda else None}


def is_device_op(event) -> bool:
    """A kernel, memcpy or memset of a profiler's kineto events: a CUDA event that is not an
    annotation range (the events torch's own device-time total sums; `activity_type`, where the
    torch version has it, must say so too)."""
    from torch.autograd import DeviceType

    if event.device_type() != DeviceType.CUDA or event.is_user_annotation():
        return False
    kind = getattr(event, "activity_type", None)
    return kind is None or kind().lower() in ("kernel", "gpu_memcpy", "gpu_memset")


def kernel_split(events, new_tokens: int) -> dict:
    """The device time of one profiled generate call, split at its token marks (module doc):
    {"first_token_kernel_s", "kernel_ms_per_token", "device_ops_per_token"}. The first is None
    when no device operation precedes the first token, the other two when none falls between the
    first and the last token: a CPU model, or a profiler that missed them (a decode step on a
    CUDA model always runs some). events: kineto events (name, device_type, start_ns,
    duration_ns, is_user_annotation)."""
    from torch.autograd import DeviceType

    marks = sorted(e.start_ns() for e in events if e.device_type() == DeviceType.CPU and e.name() == MARK)
    if len(marks) != new_tokens + 1:
        raise RuntimeError(f"the profile holds {len(marks)} token marks, expected {new_tokens + 1} "
                           "(the prompt and every new token)")
    first, last = marks[1], marks[-1]
    ops = [e for e in events if is_device_op(e)]
    before = [e.duration_ns() for e in ops if e.start_ns() < first]
    decode = [e.duration_ns() for e in ops if first <= e.start_ns() < last]
    steps = new_tokens - 1
    return {"first_token_kernel_s": sum(before) / 1e9 if before else None,
            "kernel_ms_per_token": sum(decode) / 1e6 / steps if decode else None,
            "device_ops_per_token": len(decode) / steps if decode else None}


def profiled_kernels(loaded, ids, row: str, ratio: float, new_tokens: int, cache=None,
                     compile_cpu: bool = False) -> dict:
    """kernel_split of one more generate call under torch.profiler (CPU activity, and CUDA's on a
    CUDA model); cache as generate_seconds takes it."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if str(loaded.model.device).startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        generate_seconds(loaded, ids, row, ratio, new_tokens, clock=TokenClock(mark=True), cache=cache,
                         compile_cpu=compile_cpu)
    return kernel_split(prof.profiler.kineto_results.events(), new_tokens)


def e2e_row(loaded, ids, row: str, ratio: float, new_tokens: int, repeats: int, profile: bool = False,
            compile_cpu: bool = False) -> dict:
    """One row at one prompt: a warm-up call (N new tokens for a static row, else 2), then the
    medians of `repeats` timed calls, the largest peak, and with `profile` the profiled call's
    device times and the host-bound share. A static row adds "warmup_s" and "compiled" (whether
    transformers compiled its decode step: its `get_compiled_call` keeps `model._compiled_call`)."""
    from faedkv.attention import restore_sdpa

    model = loaded.model
    device, static = str(model.device), row in STATIC_ROWS
    restore_sdpa(model.config)
    if static:
        release_static_path(model)
    # as generate keeps full-static's StaticCache, faedkv-cache-static keeps one cache for all its calls
    cache = row_cache(row, ratio) if row == "faedkv-cache-static" else None
    start_bytes = allocated_bytes(device)
    warm = generate_seconds(loaded, ids, row, ratio, new_tokens if static else 2, start_bytes, cache=cache,
                            compile_cpu=compile_cpu)
    runs = [generate_seconds(loaded, ids, row, ratio, new_tokens, start_bytes, cache=cache, compile_cpu=compile_cpu)
            for _ in range(repeats)]
    peaks = [r["peak_bytes"] for r in runs if r["peak_bytes"] is not None]
    out = {"row": row, "ratio": 0.0 if row in ("full", "full-static") else ratio,
           **{k: statistics.median(r[k] for r in runs) for k in ("ttft_s", "ms_per_token", "total_s")},
           "peak_gb": max(peaks) / 1e9 if peaks else None}
    if static:
        out.update(warmup_s=warm["total_s"], compiled=getattr(model, "_compiled_call", None) is not None)
    if profile:
        out.update(profiled_kernels(loaded, ids, row, ratio, new_tokens, cache, compile_cpu))
        kernel_ms = out["kernel_ms_per_token"]
        out["host_bound"] = None if kernel_ms is None else 1 - kernel_ms / out["ms_per_token"]
    if static:
        release_static_path(model)
    return out


def e2e_rows(loaded, lengths, new_tokens: int, ratio: float, repeats: int, rows=ROWS,
             on_row=None, profile: bool = False, compile_cpu: bool = False) -> list[dict]:
    """One dict per (length, row) (e2e_row); `on_row(rows so far)` after each, so a run cut short
    by a time limit keeps what it measured."""
    import torch

    from analysis.harness.haystack import text_tokens

    out = []
    for tokens in lengths:
        ids = torch.tensor([text_tokens(loaded.tokenizer, tokens)], device=loaded.model.device)
        for row in rows:
            out.append({"tokens": tokens, **e2e_row(loaded, ids, row, ratio, new_tokens, repeats, profile,
                                                    compile_cpu)})
            if on_row is not None:
                on_row(out)
    return out


def optional(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


PROFILE_HEADER = " GPU s to first token (kernels) | GPU ms / token (kernels) | device ops / token | host-bound share |"


def profile_cells(r: dict) -> str:
    return (f" {optional(r['first_token_kernel_s'], '.3f')} | {optional(r['kernel_ms_per_token'], '.2f')} | "
            f"{optional(r['device_ops_per_token'], '.0f')} | {optional(r['host_bound'], '.0%')} |")


def profile_note() -> str:
    return ("Profile (`--profile`): one more call per row under torch.profiler after the timed ones. GPU s to "
            "first token = the summed durations of the device operations (kernels, memcpy, memset) that start "
            "before the first new token reaches the host; GPU ms / token = those that start between the first "
            "and the last new token's arrival, summed and divided by N - 1 (the window of ms / new token; each "
            "arrival syncs, so every operation launched before it has finished); device ops / token counts "
            "them (a CUDA graph's kernels count one by one, if the profiler saw them). host-bound share = "
            "1 - GPU ms / token / ms / new token (the wall time of the unprofiled calls; the profiler slows the "
            "host, not the kernels). \"-\": no device operations (a CPU run).")


STATIC_NAMES = {
    "full-static": "full-static = transformers' StaticCache (`generate(cache_implementation=\"static\")`: prompt + "
                   "new tokens rows, all attended every step)",
    "faedkv-cache-static": "faedkv-cache-static = StaticFAEDKVCache (`generate(past_key_values="
                           "StaticFAEDKVCache(...), compile_config=CompileConfig())`: faedkv-cache's rows and math "
                           "as a fixed-shape decode step; the row keeps one cache and resets it before each call)",
}


def static_note(rows: list[dict], cpu: bool = False) -> str:
    static = [r for r in rows if r["row"] in STATIC_ROWS]
    described = "; ".join(text for row, text in STATIC_NAMES.items() if any(r["row"] == row for r in static))
    warmups = ", ".join(f"{r['warmup_s']:.2f} s at {r['tokens']} tokens ({r['row']})" for r in static)
    if all(r["compiled"] for r in static) and cpu:
        how = ("with the one-token decode forward compiled by transformers on the CPU (`--compile-cpu`: "
               "torch.compile's inductor, mode reduce-overhead, which captures no graphs off CUDA; the prefill "
               "runs eagerly). Compile time is excluded: the warm-up call (same prompt, same new tokens), which "
               "compiled, took")
    elif all(r["compiled"] for r in static):
        how = ("with the one-token decode forward compiled by transformers (`CompileConfig()`: torch.compile, "
               "mode reduce-overhead, i.e. CUDA graphs; the prefill runs eagerly). Compile time is excluded: "
               "the warm-up call (same prompt, same new tokens), which compiled and captured the graphs, took")
    else:
        how = ("run eagerly: transformers compiles generate's decode step only on CUDA/XPU (`--compile-cpu` "
               "compiles it on the CPU too). The warm-up call (same prompt, same new tokens) took")
    return (f"{described}, {how} {warmups}. The peak counts the static cache (allocated at the warm-up and kept "
            f"between calls). {NOT_STATIC}.")


def e2e_markdown(rows: list[dict], machine: str, command: str, model: str, cpu: bool = False) -> str:
    import datetime

    profiled = any("kernel_ms_per_token" in r for r in rows)
    lines = [f"### End to end: {model} (`model.generate`, {datetime.date.today()})", "",
             f"Machine: {machine}. Command: `{command}`.", "",
             "| prompt tokens | cache | ratio | time to first token (s) | ms / new token | peak over start (GB) |"
             + (PROFILE_HEADER if profiled else ""),
             "|---:|---|---:|---:|---:|---:|" + ("---:|" * 4 if profiled else "")]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['row']} | {r['ratio']:g} | {r['ttft_s']:.3f} | "
                     f"{r['ms_per_token']:.1f} | {optional(r['peak_gb'], '.2f')} |"
                     + (profile_cells(r) if profiled else ""))
    lines += ["", "faedkv = the registry's faedkv (FAEDKVPress with iwdft class means) on the prefill, then a "
              f"growing cache; {DEFAULT_ROW} = FAEDKV's default (FAEDKVPress()'s configuration) stored "
              "physically; faedkv-cache = FAEDKVCache: the prefill compressed and a fixed budget while decoding. "
              "Peak over start: the CUDA allocator's peak during a timed call over what was allocated "
              "before the row's warm-up."]
    if any(r["row"] == "dimsplit-cache" for r in rows):
        lines.append("dimsplit-cache = DimsplitCache (dim_share 0.5): the prefill's middle stored as exact "
                     "dims + low rfft bins and attended without rebuilding its rows; decoded tokens appended.")
    if any(kvzip_split_options(r["row"]) is not None for r in rows):
        lines.append(f"{KVZIP_SPLIT} = the KVzip-ranked split stored physically (DimsplitCache, exact_share 0.9, "
                     f"exact_pool global, dim_share 0.5, a recent window of 64 tokens, or N with {KVZIP_SPLIT}:window=N, or the "
                     f"larger of that and a share X of the kept rows with :window_share=X): KVzip's scoring passes over the prompt but its last token "
                     "(faedkv.kvzip.kvzip_prefill), the scored prefill stored with no further model call "
                     "(prefill_from), then generate feeds the last prompt token; time to first token counts all "
                     "of it. Heads keep different numbers of whole tokens, so each head's middle is its own "
                     "group (batch 1).")
    if any(r["row"] in STATIC_ROWS for r in rows):
        lines.append(static_note(rows, cpu))
    if profiled:
        lines.append(profile_note())
    return "\n".join(lines) + "\n"


def run_e2e(args) -> int:
    import sys

    from analysis.cli import one_line
    from analysis.harness.models import load_model

    for row in args.rows:
        try:
            row_spec(row, args.ratio)
        except ValueError as exc:
            raise SystemExit(f"row {row!r}: {one_line(exc)}; a row is faedkv-cache, dimsplit-cache, {KVZIP_SPLIT}[:window=N][:window_share=X], full-static, "
                             "faedkv-cache-static or one --methods spec (full, snapkv, "
                             "faedkv:exact_share=0.9:exact_scorer=keydiff, ...)") from None
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be at least 2 (ms per token is the time between the first and the last new token)")
    loaded = load_model(args.model, device=args.device)
    machine = machine_description(str(loaded.model.device))
    command = "python -m analysis.bench e2e " + " ".join(sys.argv[2:])

    def report(rows: list[dict]) -> str:
        text = e2e_markdown(rows, machine, command, loaded.info.name, str(loaded.model.device) == "cpu")
        if args.fragment:
            write_fragment(args.fragment, text)
        return text

    print(report(e2e_rows(loaded, args.lengths, args.new_tokens, args.ratio, args.repeats, args.rows,
                          on_row=report, profile=args.profile, compile_cpu=args.compile_cpu)))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("e2e", help="time to first token, ms per token and peak memory of model.generate")
    p.add_argument("--model", default=None, help="as every command's --model (default: the embedded model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--ratio", type=float, default=0.75)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rows", nargs="+", default=list(ROWS),
                   help=f"faedkv-cache, dimsplit-cache, {KVZIP_SPLIT} (DimsplitCache behind KVzip's global ranking; "
                        f"{KVZIP_SPLIT}:window=512 with a recent window of 512, :window_share=0.5 with half the "
                        f"kept rows), full-static "
                        f"(transformers' static cache, decode step "
                        f"compiled on CUDA), faedkv-cache-static (StaticFAEDKVCache, the same compiled path) or "
                        f"method specs as --methods writes them (default: {' '.join(ROWS)})")
    p.add_argument("--profile", action="store_true",
                   help="one more call per row under torch.profiler: GPU kernel time per token and the host-bound share")
    p.add_argument("--compile-cpu", action="store_true",
                   help="compile the static rows' decode step on the CPU too (transformers compiles only on "
                        "CUDA/XPU by default); the compile time is the warm-up's, excluded from the times")
    p.add_argument("--fragment", default="", help="also write a BENCHMARKS.md fragment here")
    p.set_defaults(func=run_e2e)
