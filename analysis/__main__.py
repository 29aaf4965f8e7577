"""`python -m analysis <command>`: the evaluation harness from the command line.

    python -m analysis needle --methods full,snapkv,faedkv:variant=resample --ratios 0.5,0.75 \\
        --lengths 1024,2048 --depths 0,50,100 --samples 5 --out results/
    python -m analysis suite --methods full,snapkv --ratios 0.75 --context-length 2048
    python -m analysis ppl --methods full,knorm --ratios 0.5 --prefix-tokens 2048
    python -m analysis store list --out results/

The commands are those of the job kinds (`analysis.tasks.kinds()`): a kind's declaration
names its `add_cli(subparsers)`, which creates the parser (`analysis.cli.add_task_parser(
subparsers, name, help)` or `subparsers.add_parser(...)`), adds its flags and sets
`func=<args -> exit code>` (running the job through `analysis.cli.run_job`); the store commands
come from analysis.cli.store. Raise ValueError (or a subclass: ModelLoadError, StoreError,
pydantic's ValidationError) for user errors: they print as one line and exit 2, without a
traceback.
"""
from __future__ import annotations

import sys

from analysis import cli


def build_parser() -> cli.ArgParser:
    from analysis.cli.store import add_store_commands
    from analysis.tasks import kinds

    parser = cli.ArgParser(prog="python -m analysis",
                           description="FAEDKV Lab evaluation harness (results go to a store).")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    for kind in kinds().values():
        if kind.cli is not None:
            kind.cli(sub)
    add_store_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from analysis.harness.methods import CompressionError
    from analysis.results.runner import Cancelled

    try:
        return args.func(args)
    except ValueError as exc:
        return cli.fail(cli.one_line(exc), 2)
    except CompressionError as exc:
        return cli.fail(cli.one_line(exc), 1)
    except (Cancelled, KeyboardInterrupt):
        print("\nstopped: the finished cells are stored; run the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
