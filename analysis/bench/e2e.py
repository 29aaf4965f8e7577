"""End to end on a real model: time to first token, ms per new token and peak memory of
`model.generate` for the full cache, kvpress presses and FAEDKV (as a press, and as FAEDKVCache
with a fixed budget while decoding).

    python -m analysis.bench e2e --model /tmp/m/model --device cuda --lengths 16384 32768 \\
        --new-tokens 256 --ratio 0.75 --fragment benchmarks/e2e-h200-qwen.md

Time to first token = a generate call of one new token (prefill + compression + one step);
ms per token = (a call of N new tokens - that call) / (N - 1). Both median of `--repeats` calls on
the same prompt (essay text), after one warm-up call. Peak memory (CUDA only) is the allocator's
peak during the N-token call minus what was allocated before it (the weights and the input).
Greedy decoding with min_new_tokens = max_new_tokens, so every row decodes the same count.
"""
from __future__ import annotations

import statistics
import time

from analysis.bench.common import machine_description, write_fragment

ROWS = ("full", "snapkv", "faedkv", "faedkv-cache")   # the default rows; any --methods spec is a row too


def row_press(row: str, ratio: float, model):
    """The press of a row: None for "full" and "faedkv-cache" (FAEDKVCache compresses itself),
    else the registry press of the method spec `row` (e.g. "faedkv:exact_share=0.9") at `ratio`."""
    from analysis.cli import parse_methods
    from analysis.harness.methods import build_press

    if row in ("full", "faedkv-cache"):
        return None
    (spec,) = parse_methods(row, [ratio])
    return build_press(spec, model)


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def generate_seconds(loaded, ids, row: str, ratio: float, new_tokens: int) -> tuple[float, int | None]:
    """(seconds, peak bytes over the start or None off CUDA) of one generate call."""
    import torch
    from transformers import DynamicCache

    from faedkv import FAEDKVCache

    model, device = loaded.model, str(loaded.model.device)
    press = row_press(row, ratio, model)
    cache = FAEDKVCache(compression_ratio=ratio) if row == "faedkv-cache" else DynamicCache()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        start_bytes = torch.cuda.memory_allocated()
    synchronize(device)
    start = time.perf_counter()
    kwargs = dict(past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, pad_token_id=loaded.tokenizer.eos_token_id)
    with torch.inference_mode():
        if press is None:
            model.generate(ids, **kwargs)
        else:
            with press(model):
                model.generate(ids, **kwargs)
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - start_bytes if cuda else None
    return seconds, peak


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
            first = [generate_seconds(loaded, ids, row, ratio, 1)[0] for _ in range(repeats)]
            runs = [generate_seconds(loaded, ids, row, ratio, new_tokens) for _ in range(repeats)]
            ttft, total = statistics.median(first), statistics.median(s for s, _ in runs)
            peaks = [p for _, p in runs if p is not None]
            out.append({"tokens": tokens, "row": row, "ratio": 0.0 if row == "full" else ratio,
                        "ttft_s": ttft, "ms_per_token": 1e3 * (total - ttft) / max(1, new_tokens - 1),
                        "total_s": total, "peak_gb": max(peaks) / 1e9 if peaks else None})
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
    return "\n".join(lines) + "\n"


def run_e2e(args) -> int:
    import sys

    from analysis.cli import one_line, parse_methods
    from analysis.harness.models import load_model

    for row in args.rows:
        try:
            if row != "faedkv-cache" and len(parse_methods(row, [args.ratio])) != 1:
                raise ValueError("one method per row")
        except ValueError as exc:
            raise SystemExit(f"row {row!r}: {one_line(exc)}; a row is faedkv-cache or one --methods spec "
                             "(full, snapkv, faedkv:exact_share=0.9:exact_scorer=keydiff, ...)") from None
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be at least 2 (ms per token needs two calls to differ)")
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
                   help=f"faedkv-cache or method specs as --methods writes them (default: {' '.join(ROWS)})")
    p.add_argument("--fragment", default="", help="also write a BENCHMARKS.md fragment here")
    p.set_defaults(func=run_e2e)
