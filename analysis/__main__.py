"""`python -m analysis <command>`: the evaluation harness from the command line.

    python -m analysis needle --methods full,snapkv,faedkv:variant=resample --ratios 0.5,0.75 \\
        --lengths 1024,2048 --depths 0,50,100 --samples 5 --out results/
    python -m analysis suite --methods full,snapkv --ratios 0.75 --context-length 2048
    python -m analysis ppl --methods full,knorm --ratios 0.5 --prefix-tokens 2048
    python -m analysis store list --out results/

Adding a command: write `add_cli(subparsers)` in your module (create the parser with
`analysis.cli.add_task_parser(subparsers, name, help)` or `subparsers.add_parser(...)`, add
your flags, and `set_defaults(func=<args -> exit code>)`), then append the module's name to
COMMAND_MODULES below. Raise ValueError (or a subclass: ModelLoadError, StoreError, pydantic's
ValidationError) for user errors: they print as one line and exit 2, without a traceback.
"""
from __future__ import annotations

import importlib
import sys

from analysis import cli

# Modules with an `add_cli(subparsers)`; the store commands come from analysis.cli_store.
COMMAND_MODULES = (
    "analysis.tasks.needle",
    "analysis.tasks.suite",
    "analysis.tasks.ppl",
    "analysis.spectra",
    "analysis.ablation",
    "analysis.contrib",
)


def build_parser() -> cli.ArgParser:
    from analysis.cli_store import add_store_commands

    parser = cli.ArgParser(prog="python -m analysis",
                           description="FAEDKV Lab evaluation harness (results go to a store).")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    add_store_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from analysis.methods import CompressionError
    from analysis.runner import Cancelled

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
