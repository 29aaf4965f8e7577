"""`python -m analysis.bench tasks`: what the analyses cost and find on the embedded model (CPU).

Loads the model, then times and records, into one markdown fragment headed by the machine:
an interactive generation (the app's "re-run generation": 2K needle prompt, full vs FAEDKV's
default and iwdft at 0.5; `--generate-only` stops there),
the needle grid and the RULER-style suite for the kvpress baselines and FAEDKV, and one spectra
run (the app's "Spectra" page). Results go to a fresh store under --store (kept, so a killed run
resumes with the same command); the fragment goes to --out.

`--qwen PATH` adds the CPU reference on a real model (Qwen2.5-Coder-0.5B-Instruct's GGUF, from
`../shared/tools/qwen-gguf 0.5b`): a small needle grid and the continuation NLL after a prefix,
full / SnapKV / StreamingLLM / FAEDKV's default / iwdft (the registry's faedkv) at one ratio, into its own fragment
(--qwen-out); `--qwen-only` skips the embedded model's part.
"""
from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

from analysis.bench.common import machine_description, write_fragment

DEFAULT_METHODS = "full,streaming_llm,snapkv,knorm,faedkv-default,faedkv,faedkv:variant=resample"
QWEN_METHODS = "full,snapkv,streaming_llm,faedkv-default,faedkv"


def rerun_rows(loaded, repeats: int) -> list[tuple[str, float, float]]:
    """The app's "re-run generation" (a 2048-token needle at depth 50, an answer of up to 32 tokens,
    no full-cache comparison) for the full cache, FAEDKV's default and iwdft class means at ratio
    0.5: (what, median seconds of `repeats` calls after a warm-up, that over the full cache's)."""
    import statistics

    from analysis.api.params import FAEDKV_DEFAULT, GenerateParams, MethodSpec, TaskPrompt
    from analysis.tasks.generate import generate

    prompt = TaskPrompt(kind="needle", context_length=2048, depth=50.0, seed=0)
    rows = []
    for what, spec in (("full", MethodSpec(name="full")),
                       ("FAEDKV's default @ 0.5", MethodSpec(name="faedkv", compression_ratio=0.5,
                                                             params=FAEDKV_DEFAULT)),
                       ("faedkv-iwdft @ 0.5", MethodSpec(name="faedkv", compression_ratio=0.5))):
        params = GenerateParams(prompt=prompt, method=spec, compare_full=False)
        generate(loaded, params)  # the first call pays one-off costs (kernels, haystack tokens)
        seconds = statistics.median(timed(generate, loaded, params)[1] for _ in range(repeats))
        rows.append((what, seconds, seconds / rows[0][1] if rows else 1.0))
    return rows


def rerun_lines(rows) -> list[str]:
    return [f"| generate | 2048-token needle prompt, {what}, answer of up to 32 tokens | {seconds:.1f} "
            f"({ratio:.2f}x full) |" for what, seconds, ratio in rows]


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def run_tasks(args) -> int:
    import torch

    from analysis.api.params import NeedleParams, SpectraParams, SuiteParams
    from analysis.cli import parse_methods
    from analysis.harness.models import load_model
    from analysis.results.store import ResultsStore
    from analysis.tasks.needle import needle_markdown, run_needle
    from analysis.tasks.spectral.spectra import run_spectra
    from analysis.tasks.suite import run_suite, suite_markdown

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.qwen and not Path(args.qwen).expanduser().is_file():
        print(f"error: --qwen {args.qwen!r} is not a file: run `../shared/tools/qwen-gguf 0.5b` "
              "(it prints the GGUF's path) and pass that path.", file=sys.stderr)
        return 2
    if args.qwen_only and not args.qwen:
        print("error: --qwen-only needs --qwen PATH (the Qwen2.5-Coder-0.5B GGUF).", file=sys.stderr)
        return 2
    if args.qwen:
        run_qwen(args)
    if args.qwen_only:
        return 0
    loaded, load_s = timed(load_model, device=args.device)
    command = (f"python -m analysis.bench tasks --generate-only --repeats {args.repeats} --out {args.out}"
               if args.generate_only else
               f"python -m analysis.bench tasks --lengths {','.join(map(str, args.lengths))} "
               f"--samples {args.samples} --suite-length {args.suite_length} --repeats {args.repeats}")
    title = "The app's re-run generation" if args.generate_only else "Analyses"
    lines = [f"### {title} on the embedded model ({datetime.date.today().isoformat()}, {args.device})", "",
             f"Machine: {machine_description(args.device)}. Model: {loaded.info.name} "
             f"({loaded.info.dtype}), loaded in {load_s:.1f} s.", "",
             f"Command: `{command}`", "",
             "| step | what | seconds |", "|---|---|---:|"]
    lines += rerun_lines(rerun_rows(loaded, args.repeats))
    if args.generate_only:
        lines += ["", f"Median of {args.repeats} calls after a warm-up; FAEDKV's default runs KVzip's scoring passes "
                  "over the prompt after the prefill (analysis.api.params.FAEDKV_DEFAULT)."]
        return finish(args, lines)
    store = ResultsStore(args.store)
    methods = parse_methods(args.methods, args.ratios)
    _, seconds = timed(run_spectra, loaded, store, SpectraParams(num_tokens=2048))
    lines.append(f"| spectra | 2048 tokens, all layers, K/V pre/post-RoPE | {seconds:.1f} |")
    needle_params = NeedleParams(methods=methods, lengths=args.lengths, depths=[0, 50, 100],
                                 samples=args.samples)
    needle_key, needle_s = timed(run_needle, loaded, store, needle_params)
    lines.append(f"| needle grid | {needle_params.num_cells()} cells | {needle_s:.0f} |")
    suite_params = SuiteParams(methods=methods, context_length=args.suite_length, samples=args.samples)
    suite_key, suite_s = timed(run_suite, loaded, store, suite_params)
    lines.append(f"| suite | {suite_params.num_cells()} cells at {args.suite_length} tokens | {suite_s:.0f} |")
    lines += ["", "(A resumed run counts only the cells it computed.)", "",
              needle_markdown(store.get(needle_key), detail=True), "",
              suite_markdown(store.get(suite_key))]
    return finish(args, lines)


def finish(args, lines: list[str]) -> int:
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return 0


def qwen_command(args) -> str:
    return (f"python -m analysis.bench tasks --qwen {args.qwen} --qwen-only --qwen-length "
            f"{args.qwen_length} --qwen-samples {args.qwen_samples} --qwen-texts {args.qwen_texts} "
            f"--qwen-continuation {args.qwen_continuation} --qwen-ratio {args.qwen_ratio:g} "
            f"--qwen-methods {args.qwen_methods}")


def run_qwen(args) -> None:
    """The CPU reference on Qwen2.5-Coder-0.5B: needle grid (one length, depths 0/50/100) and
    continuation NLL after a prefix of the same length, one fragment."""
    from analysis.api.params import NeedleParams, PplParams
    from analysis.cli import parse_methods
    from analysis.harness import methods as registry
    from analysis.harness.models import load_model
    from analysis.results.store import ResultsStore
    from analysis.tasks.needle import needle_markdown, run_needle
    from analysis.tasks.ppl import ppl_markdown, run_ppl

    store = ResultsStore(args.store)
    loaded, load_s = timed(load_model, args.qwen, device=args.device)
    info = loaded.info
    methods = parse_methods(args.qwen_methods, [args.qwen_ratio])
    faedkv = [f"{m.label}: {registry.method_params(m)}" for m in methods if m.name == "faedkv"]
    needle_params = NeedleParams(methods=methods, lengths=[args.qwen_length], depths=[0, 50, 100],
                                 samples=args.qwen_samples)
    needle_key, needle_s = timed(run_needle, loaded, store, needle_params)
    ppl_params = PplParams(methods=methods, prefix_tokens=args.qwen_length,
                           continuation_tokens=args.qwen_continuation, num_texts=args.qwen_texts)
    ppl_key, ppl_s = timed(run_ppl, loaded, store, ppl_params)
    lines = [f"### CPU reference on Qwen2.5-Coder-0.5B ({datetime.date.today().isoformat()}, {args.device})", "",
             f"Machine: {machine_description(args.device)}. Model: {info.name} (GGUF sha256 "
             f"{(info.sha256 or '?')[:16]}, {info.num_layers} layers, {info.num_kv_heads} KV heads, "
             f"head_dim {info.head_dim}, context {info.context_length}; {info.dtype}), loaded in "
             f"{load_s:.1f} s.", "",
             f"Command: `{qwen_command(args)}`", "",
             f"FAEDKV's parameters (the registry's defaults filled in): {'; '.join(f'`{p}`' for p in faedkv) or '-'}.",
             "",
             "| step | what | seconds |", "|---|---|---:|",
             f"| needle grid | {needle_params.num_cells()} cells at {args.qwen_length} tokens | {needle_s:.0f} |",
             f"| ppl | {ppl_params.num_cells()} cells, {args.qwen_length}-token prefix | {ppl_s:.0f} |",
             "", "(A resumed run counts only the cells it computed.)", "",
             needle_markdown(store.get(needle_key), detail=True), "",
             ppl_markdown(store.get(ppl_key))]
    text = "\n".join(lines) + "\n"
    if args.qwen_out:
        write_fragment(args.qwen_out, text)
    print(text)


def add_parser(sub) -> None:
    from analysis.cli import float_list, int_list

    p = sub.add_parser("tasks", help="generation, needle, suite and spectra on the embedded model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--ratios", type=float_list, default=[0.5, 0.75])
    p.add_argument("--lengths", type=int_list, default=[1024, 2048])
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--suite-length", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=1, help="timed calls per generation row (median)")
    p.add_argument("--generate-only", action="store_true",
                   help="only the app's re-run generation rows (full, FAEDKV's default, iwdft)")
    p.add_argument("--store", default="results/bench-tasks", help="results store (resumes)")
    p.add_argument("--out", default="benchmarks/tasks-cpu.md", help="markdown fragment to write")
    p.add_argument("--qwen", default=None, metavar="GGUF",
                   help="also run the CPU reference on this Qwen2.5-Coder-0.5B GGUF "
                        "(`../shared/tools/qwen-gguf 0.5b` prints its path)")
    p.add_argument("--qwen-only", action="store_true", help="run only the --qwen section")
    p.add_argument("--qwen-methods", default=QWEN_METHODS)
    p.add_argument("--qwen-ratio", type=float, default=0.5)
    p.add_argument("--qwen-length", type=int, default=2048, help="needle context and ppl prefix")
    p.add_argument("--qwen-samples", type=int, default=1, help="needle samples per depth")
    p.add_argument("--qwen-texts", type=int, default=1, help="ppl texts")
    p.add_argument("--qwen-continuation", type=int, default=128, help="ppl continuation tokens")
    p.add_argument("--qwen-out", default="benchmarks/tasks-cpu-qwen.md", help="its markdown fragment")
    p.set_defaults(func=run_tasks)


def run_shipped(args) -> int:
    """The shipped analyses (assets/results) as tables: token-contribution equality per method,
    the ablation's largest chunk effects, and the plan comparison, read from the stored runs."""
    import datetime as dt

    import json

    # Read the run folders directly: a store object would write an index into assets/.
    metrics = {}
    for path in sorted(Path(args.store, "runs").glob("*/metrics.json")):
        metrics.setdefault(path.parent.name.split("-")[0], json.loads(path.read_text()))
    lines = [f"### Shipped analyses of the embedded model (rendered {dt.date.today().isoformat()})", "",
             f"Command: `python -m analysis.bench shipped --store {args.store}`; the runs and the "
             "commands that made them: `assets/README.md`.", ""]
    m = metrics.get("contrib")
    if m:
        lines += [f"Token contribution at {m['context_length']} tokens (1 = every token equal):", "",
                  "| method | source | 1 - Gini | oldest / newest tenth | min / max |", "|---|---|---:|---:|---:|"]
        for label, r in m["methods"].items():
            lines.append(f"| {label} | {r['source']} | {r['one_minus_gini']:.3f} | "
                         f"{r['oldest_over_newest']:.3f} | {r['min_over_max']:.3f} |")
        lines.append("")
    m = metrics.get("ablate")
    if m and m.get("plan_comparison"):
        lines += ["Plan comparison (FAEDKV iwdft with frequency plans; needle and suite accuracy):", "",
                  "| ratio | plan | keep | needle acc. | suite avg | suite rel. full |", "|---|---|---:|---:|---:|---:|"]
        for r in m["plan_comparison"]:
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:g}"
            keep = "-" if r["keep"] is None else f"{r['keep']:g}"
            lines.append(f"| {ratio} | {r['plan']} | {keep} | {100 * r['needle_accuracy']:.0f}% | "
                         f"{r['suite_average']:.3f} | {100 * r['suite_rel_full']:.0f}% |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_fragment(args.out, text)
    return 0


def add_shipped_parser(sub) -> None:
    p = sub.add_parser("shipped", help="tables of the shipped analyses (assets/results)")
    p.add_argument("--store", default="assets/results")
    p.add_argument("--out", default="benchmarks/shipped-analyses.md")
    p.set_defaults(func=run_shipped)
