"""End to end on a real model: time to first token, ms per new token and peak memory of
`model.generate` for the full cache, kvpress presses and FAEDKV (as a press, as FAEDKVCache
with a fixed budget while decoding, and as DimsplitCache: the dimension split stored physically).

    python -m analysis.bench e2e --model /tmp/m/model --device cuda --lengths 16384 32768 \\
        --new-tokens 256 --ratio 0.75 --fragment benchmarks/e2e-h200-qwen.md

Both times come from one generate call of N new tokens, clocked by a streamer that notes when each
new token reaches the host (generate hands it over with `.cpu()`, so on CUDA the token is
computed): time to first token = the first new token's time since the call began (prefill +
compression + one step); ms per token = (last token's time - first token's) / (N - 1). Each is the
median of `--repeats` calls on the same prompt (essay text), after one warm-up call. (Two calls
of 1 and N tokens, subtracted, went negative when a press's prefill varies by more than the
decode takes: KVzip's does.) Peak memory (CUDA only) is the allocator's peak during the call
minus what was allocated before it (the weights and the input). Greedy decoding with
min_new_tokens = max_new_tokens, so every row decodes the same count.
"""
from __future__ import annotations

import statistics
import time

from analysis.bench.common import machine_description, write_fragment

ROWS = ("full", "snapkv", "faedkv", "faedkv-cache")   # the default rows; any --methods spec is a row too
CACHE_ROWS = ("faedkv-cache", "dimsplit-cache")       # rows whose cache compresses itself (no press)


def row_cache(row: str, ratio: float):
    """The cache a row generates with: FAEDKVCache, DimsplitCache (dim_share 0.5, the press's
    default sink and window) or a DynamicCache."""
    from transformers import DynamicCache

    from faedkv import DimsplitCache, FAEDKVCache

    if row == "faedkv-cache":
        return FAEDKVCache(compression_ratio=ratio)
    if row == "dimsplit-cache":
        return DimsplitCache(compression_ratio=ratio, dim_share=0.5)
    return DynamicCache()


def row_spec(row: str, ratio: float):
    """The MethodSpec of a row (None for the CACHE_ROWS); ValueError for what this bench cannot
    time. KVzip scores when its `with` block ends, and model.generate decodes inside the block,
    so its rows (and FAEDKV hybrids scored by KVzip) would decode over the full cache."""
    from analysis.cli import parse_methods
    from analysis.harness.methods import method_params

    if row in CACHE_ROWS:
        return None
    specs = parse_methods(row, [ratio])
    if len(specs) != 1:
        raise ValueError("one method per row")
    spec = specs[0]
    params = method_params(spec) if spec.name == "faedkv" else {}
    if spec.name == "kvzip" or (params.get("exact_scorer") == "kvzip" and params.get("exact_share")):
        raise ValueError("KVzip compresses when its `with` block ends, after model.generate has "
                         "decoded on the full cache; time it with kvpress's pipeline (prefill under "
                         "the press, then decode), not here")
    return spec


def row_press(row: str, ratio: float, model):
    """The press of a row: None for "full" and the CACHE_ROWS (their caches compress themselves),
    else the registry press of the method spec `row` (e.g. "faedkv:exact_share=0.9") at `ratio`."""
    from analysis.harness.methods import build_press

    spec = row_spec(row, ratio)
    return None if spec is None or spec.name == "full" else build_press(spec, model)


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class TokenClock:
    """A generate streamer that notes the time of each `put`: the prompt first, then every new
    token (ids arrive on the host, so the step that made them is done)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def generate_seconds(loaded, ids, row: str, ratio: float, new_tokens: int) -> dict:
    """One generate call: {"total_s", "ttft_s", "ms_per_token" (None for one new token),
    "peak_bytes" (over the start; None off CUDA)}."""
    import torch

    model, device = loaded.model, str(loaded.model.device)
    press = row_press(row, ratio, model)
    cache = row_cache(row, ratio)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        start_bytes = torch.cuda.memory_allocated()
    clock = TokenClock()
    synchronize(device)
    start = time.perf_counter()
    kwargs = dict(past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, pad_token_id=loaded.tokenizer.eos_token_id, streamer=clock)
    with torch.inference_mode():
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


def e2e_rows(loaded, lengths, new_tokens: int, ratio: float, repeats: int, rows=ROWS,
             on_row=None) -> list[dict]:
    """One dict per (length, row); `on_row(rows so far)` after each, so a run cut short by a
    time limit keeps what it measured."""
    import torch

    from analysis.harness.haystack import text_tokens

    out = []
    for tokens in lengths:
        ids = torch.tensor([text_tokens(loaded.tokenizer, tokens)], device=loaded.model.device)
        for row in rows:
            generate_seconds(loaded, ids, row, ratio, 2)                      # warm-up
            runs = [generate_seconds(loaded, ids, row, ratio, new_tokens) for _ in range(repeats)]
            peaks = [r["peak_bytes"] for r in runs if r["peak_bytes"] is not None]
            out.append({"tokens": tokens, "row": row, "ratio": 0.0 if row == "full" else ratio,
                        **{k: statistics.median(r[k] for r in runs) for k in ("ttft_s", "ms_per_token", "total_s")},
                        "peak_gb": max(peaks) / 1e9 if peaks else None})
            if on_row is not None:
                on_row(out)
    return out


def e2e_markdown(rows: list[dict], machine: str, command: str, model: str) -> str:
    import datetime

    lines = [f"### End to end: {model} (`model.generate`, {datetime.date.today()})", "",
             f"Machine: {machine}. Command: `{command}`.", "",
             "| prompt tokens | cache | ratio | time to first token (s) | ms / new token | peak over start (GB) |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
        lines.append(f"| {r['tokens']} | {r['row']} | {r['ratio']:g} | {r['ttft_s']:.3f} | "
                     f"{r['ms_per_token']:.1f} | {peak} |")
    lines += ["", "faedkv = FAEDKVPress (registry defaults) on the prefill, then a growing cache; "
              "faedkv-cache = FAEDKVCache: the prefill compressed and a fixed budget while decoding."]
    if any(r["row"] == "dimsplit-cache" for r in rows):
        lines.append("dimsplit-cache = DimsplitCache (dim_share 0.5): the prefill's middle stored as exact "
                     "dims + low rfft bins and attended without rebuilding its rows; decoded tokens appended.")
    return "\n".join(lines) + "\n"


def run_e2e(args) -> int:
    import sys

    from analysis.cli import one_line
    from analysis.harness.models import load_model

    for row in args.rows:
        try:
            row_spec(row, args.ratio)
        except ValueError as exc:
            raise SystemExit(f"row {row!r}: {one_line(exc)}; a row is faedkv-cache, dimsplit-cache or one --methods spec "
                             "(full, snapkv, faedkv:exact_share=0.9:exact_scorer=keydiff, ...)") from None
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be at least 2 (ms per token is the time between the first and the last new token)")
    loaded = load_model(args.model, device=args.device)
    machine = machine_description(str(loaded.model.device))
    command = "python -m analysis.bench e2e " + " ".join(sys.argv[2:])

    def report(rows: list[dict]) -> str:
        text = e2e_markdown(rows, machine, command, loaded.info.name)
        if args.fragment:
            write_fragment(args.fragment, text)
        return text

    print(report(e2e_rows(loaded, args.lengths, args.new_tokens, args.ratio, args.repeats, args.rows,
                          on_row=report)))
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
                   help=f"faedkv-cache, dimsplit-cache or method specs as --methods writes them (default: {' '.join(ROWS)})")
    p.add_argument("--fragment", default="", help="also write a BENCHMARKS.md fragment here")
    p.set_defaults(func=run_e2e)
