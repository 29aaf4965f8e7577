"""Throughput of the backend against running the same grids in-process (cells per minute).

    python -m analysis.bench.server --model smollm2-135m-instruct --device cuda \\
        --lengths 1024,2048,4096 --methods snapkv,faedkv --ratios 0.75

1. starts `python -m analysis.service.server` in a subprocess (fresh store), submits a needle grid and
   an ablation through `analysis.api.client`, times each from submission to "done";
2. stops it, loads the model in this process and runs the same two grids with `run_needle` /
   `run_ablation` on another fresh store;
3. prints a markdown table (cells, seconds, cells/minute for both, server/in-process) headed by
   the machine, model and device.

Model loading and server start-up are excluded from both (reported separately), and each side
first runs a one-sample warm-up grid: the figure is what a job costs once the backend is up.
Both sides start from empty stores, so nothing resumes.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from analysis.api.params import AblateParams, NeedleParams
from analysis.bench.common import machine_description, write_fragment
from analysis.cli import float_list, int_list, parse_methods


def warmup(needle: NeedleParams) -> NeedleParams:
    """A one-sample grid on other seeds: imports, kernels and caches warm before timing."""
    return needle.model_copy(update={"lengths": needle.lengths[:1], "depths": [50.0],
                                     "samples": 1, "seed": needle.seed + 1})


def through_server(args, needle: NeedleParams, ablate: AblateParams, store: Path) -> dict:
    """{job: (cells, seconds)} through a server subprocess, plus its start-up time."""
    from analysis.api.client import LocalBackend

    out = {}
    started = time.perf_counter()
    backend = LocalBackend(model=args.model, store=store, device=args.device, dtype=args.dtype,
                           extra_args=("--import-assets", ""), startup_timeout=1800)
    with backend as client:
        out["startup"] = time.perf_counter() - started
        out["info"] = client.health()["model"]
        client.wait(client.submit("needle", warmup(needle))["id"], poll=0.2)
        for name, kind, params in (("needle", "needle", needle), ("ablation", "ablate", ablate)):
            t0 = time.perf_counter()
            job = client.wait(client.submit(kind, params)["id"], poll=0.2)
            seconds = time.perf_counter() - t0
            if job["status"] != "done":
                raise RuntimeError(f"server {kind} job {job['status']}: {job['error']}")
            out[name] = (job["progress"]["total"], seconds)
    return out


def in_process(args, needle: NeedleParams, ablate: AblateParams, store: Path) -> dict:
    """The same grids with the job functions called directly."""
    from analysis.harness.models import load_model
    from analysis.results.store import ResultsStore
    from analysis.tasks.needle import run_needle
    from analysis.tasks.spectral.ablation import run_ablation

    out = {}
    t0 = time.perf_counter()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    out["startup"] = time.perf_counter() - t0
    results = ResultsStore(store)
    run_needle(loaded, results, warmup(needle), show_progress=False)
    for name, fn, params, extra in (("needle", run_needle, needle, {"show_progress": False}),
                                    ("ablation", run_ablation, ablate, {})):
        total = {}
        t0 = time.perf_counter()
        fn(loaded, results, params, progress=lambda d, n: total.update(n=n), **extra)
        out[name] = (total.get("n", 0), time.perf_counter() - t0)
    return out


def table(server: dict, local: dict) -> str:
    rows = ["| grid | cells | server s | server cells/min | in-process s | in-process cells/min "
            "| server / in-process |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("needle", "ablation"):
        (n, s), (m, t) = server[name], local[name]
        rate_s, rate_l = 60 * n / s, 60 * m / t
        rows.append(f"| {name} | {n} | {s:.1f} | {rate_s:.1f} | {t:.1f} | {rate_l:.1f} | "
                    f"{rate_s / rate_l:.2f} |")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis.bench.server",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--lengths", type=int_list, default=[1024, 2048])
    p.add_argument("--depths", type=float_list, default=[0.0, 50.0, 100.0])
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--methods", default="snapkv,faedkv")
    p.add_argument("--ratios", type=float_list, default=[0.75])
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--ablate-chunks", type=int, default=8)
    p.add_argument("--ablate-layers", type=int_list, default=None,
                   help="layers to ablate (default: every layer)")
    p.add_argument("--ablate-prefix", type=int, default=1024)
    p.add_argument("--ablate-continuation", type=int, default=64)
    p.add_argument("--ablate-texts", type=int, default=1)
    p.add_argument("--ablate-sink", type=int, default=4)
    p.add_argument("--ablate-window", type=int, default=64)
    p.add_argument("--fragment", default="benchmarks/server-cpu.md",
                   help="markdown fragment for BENCHMARKS.md ('' for none)")
    p.add_argument("--workdir", default=None, help="where the two fresh stores go (default: a temp dir, removed)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        needle = NeedleParams(methods=parse_methods(args.methods, args.ratios),
                              lengths=args.lengths, depths=args.depths, samples=args.samples,
                              max_new_tokens=args.max_new_tokens)
        ablate = AblateParams(chunks=args.ablate_chunks, layers=args.ablate_layers,
                              prefix_tokens=args.ablate_prefix,
                              continuation_tokens=args.ablate_continuation,
                              num_texts=args.ablate_texts, needle_samples=0,
                              sink_tokens=args.ablate_sink, window=args.ablate_window)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="faedkv-bench-"))
    for sub in ("server", "inprocess"):
        if (work / sub).exists():
            shutil.rmtree(work / sub)
    try:
        server = through_server(args, needle, ablate, work / "server")
        local = in_process(args, needle, ablate, work / "inprocess")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    info = server["info"]
    command = "python -m analysis.bench.server " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([
        f"### Backend throughput: server vs in-process ({time.strftime('%Y-%m-%d')}, {info['device']})", "",
        f"Command: `{command.strip()}`", "",
        f"Machine: {machine_description(info['device'])}. Model: {info['name']} ({info['num_layers']} layers, {info['dtype']}, "
        f"{info['device']}); needle lengths {args.lengths}, depths {args.depths}, "
        f"{args.samples} samples, methods {args.methods} @ {args.ratios}, "
        f"{args.max_new_tokens} new tokens; ablation {args.ablate_chunks} chunks x "
        f"{'all' if args.ablate_layers is None else len(args.ablate_layers)} layers. "
        f"Start-up (excluded): server {server['startup']:.1f} s, in-process model load "
        f"{local['startup']:.1f} s.", "",
        table(server, local)]) + "\n"
    print(text)
    if args.fragment:
        write_fragment(args.fragment, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
