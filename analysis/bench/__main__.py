"""`python -m analysis.bench <subcommand>`: one parser over the benchmark modules' subcommands.

    python -m analysis.bench compress --lengths 8192 32768 --layers 8    # compress.py
    python -m analysis.bench tasks                                       # tasks.py (also: shipped)
    python -m analysis.bench gpu --parts compress decode                 # gpu.py (also: gpu-render)
    python -m analysis.bench gpu --parts real-compress --model M         # real_compress.py (CPU too)
    python -m analysis.bench e2e --model M --device cuda                 # e2e.py
    python -m analysis.bench report                                      # report.py: BENCHMARKS.md
"""
from __future__ import annotations

import argparse

from analysis.bench import compress, e2e, gpu, report, tasks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m analysis.bench",
                                     description="Benchmarks: `python -m analysis.bench compress|gpu|tasks|report [...]`.")
    sub = parser.add_subparsers(dest="command", required=True)
    compress.add_parser(sub)
    tasks.add_parser(sub)
    tasks.add_shipped_parser(sub)
    report.add_parser(sub)
    gpu.add_parser(sub)
    e2e.add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
