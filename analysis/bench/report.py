"""`python -m analysis.bench report`: BENCHMARKS.md assembled from the fragments in benchmarks/."""
from __future__ import annotations

import os

from analysis.bench.common import write_fragment

# Fragments in the order BENCHMARKS.md shows them; any other *.md in the folder follows.
REPORT_ORDER = ("gpu-h200-qwen-quality.md", "e2e-h200-qwen-speed2.md", "e2e-h200-qwen-speed2-rest.md", "e2e-h200-qwen-static.md", "e2e-h200-qwen-profile.md", "e2e-h200-qwen.md",
                "gpu-h200-real-compress-qwen.md", "gpu-h200-fold.md", "gpu-h200-speed-recheck.md", "rerun-cpu-smollm2.md", "e2e-cpu-qwen05b-default.md", "e2e-cpu-smollm2-compiled.md", "e2e-cpu-qwen05b-compiled.md", "e2e-cpu-qwen05b-kvzip-split.md", "e2e-cpu-qwen05b-window-share.md", "e2e-cpu-smollm2-dimsplit.md", "e2e-cpu-smollm2.md", "gpu-h200-class-means.md", "gpu-h200.md", "gpu-h200-decode.md", "gpu-h200-decode-repeat.md", "gpu-h200-decode-plan.md",
                "gpu-h200-before-fusion.md",
                "gpu-h200-grid.md", "gpu-h200-needle.md", "gpu-h200-needle-query-aware.md", "compress-cpu.md",
                "tasks-cpu.md", "shipped-analyses.md", "server-h200-llama8b.md", "server-h200-smollm2.md",
                "server-cpu.md")
REPORT_HEAD = """# Benchmarks

Every table below was written by a script (`python -m analysis.bench ...`, or
`python -m analysis.bench.server` for the backend) into `benchmarks/`, and this file was assembled
from those fragments by `python -m analysis.bench report`. Each fragment names its date, machine
and command; re-run the command on your machine to reproduce it. Times are medians, speed is
compared as ratios measured within one run, and CPU numbers come from a shared 2-core machine.

The sections dated 2026-12-01 or later (quality on Qwen2.5-Coder-1.5B, end to end on it and on the
embedded model, the class-mean kernels) measure FAEDKV as it is now: slots are class means with a
log-count mass. Sections dated before 2026-12-01 measured the first reading, (M/t) x class sums.
Their speed figures still describe the kernels' layout, but their FAEDKV quality figures describe a
normalisation that broke real models (+6 nats on Qwen2.5; see docs/RESULTS.md).

FAEDKV's default (`FAEDKVPress()`) is, from 2026-12-05 on, the search's winner: the dimension split
behind KVzip's ranking (`analysis.api.params.FAEDKV_DEFAULT`). A row named `faedkv` is the registry's
iwdft base unless its spec says otherwise; the default's rows say "FAEDKV's default" or
`kvzip-split-cache:window_share=0.5` (its physical store).
"""


def run_report(args) -> int:
    folder = args.fragments
    if not os.path.isdir(folder):
        raise SystemExit(f"no fragments folder {folder!r}: run a benchmark first "
                         "(e.g. python -m analysis.bench compress)")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".md"))
    ordered = [n for n in REPORT_ORDER if n in names] + [n for n in names if n not in REPORT_ORDER]
    parts = [REPORT_HEAD]
    for name in ordered:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            parts.append(f.read().strip() + "\n")
    write_fragment(args.out, "\n".join(parts))
    print(f"{args.out}: {len(ordered)} fragments ({', '.join(ordered)})")
    return 0


def add_parser(sub) -> None:
    r = sub.add_parser("report", help="assemble BENCHMARKS.md from the fragments in benchmarks/")
    r.add_argument("--fragments", default="benchmarks")
    r.add_argument("--out", default="BENCHMARKS.md")
    r.set_defaults(func=run_report)
