"""`python -m analysis store list|show|delete|reindex|verify --out results/`.

Writing commands (delete, reindex, verify --repair) take the store's writer lock, so they
refuse to run while a server or another command writes the same store.

Wire it into a CLI with

    sub = parser.add_subparsers(dest="command")
    add_store_commands(sub)
    args = parser.parse_args()
    raise SystemExit(args.func(args))       # each store command sets `func`; returns an exit code

`python -m analysis.cli.store ...` runs the same commands on their own.
"""
from __future__ import annotations

import argparse
import json
import sys

import yaml

from analysis.results.store import INCOMPLETE_RUN, ResultsStore, StoreError

DEFAULT_OUT = "results"


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain text table: a header, a rule, one line per row; columns padded to fit."""
    cells = [[("" if row.get(c) is None else str(row.get(c))) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def _metrics_summary(metrics: dict | None, width: int = 60) -> str:
    """The top-level numbers of a run's metrics, e.g. "accuracy=0.8 samples=40"."""
    if not metrics:
        return ""
    parts = []
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    text = " ".join(parts)
    return text if len(text) <= width else text[: width - 3] + "..."


def _short_time(stamp: str | None) -> str:
    return (stamp or "")[:19].replace("T", " ")


def _recount(store: ResultsStore, row: dict) -> dict:
    """The row with its intact cells counted from the files (a cell deleted or damaged by hand
    does not reach the index); a complete run short of intact cells lists as incomplete."""
    try:
        intact, damaged = store.get(f"{row['kind']}-{row['key']}").inspect()
    except (StoreError, OSError):
        return {**row, "status": "broken"}
    row = {**row, "cells_done": len(intact)}
    total = row["cells_total"]
    if row["status"] == "complete" and (damaged or (total is not None and len(intact) < total)):
        row.update(status="incomplete", error=INCOMPLETE_RUN)
    return row


def cmd_list(args) -> int:
    store = ResultsStore(args.out)
    rows = [_recount(store, r) for r in store.runs(kind=args.kind, limit=args.limit)]
    if not rows:
        print(f"no runs in {store.root}" + (f" of kind {args.kind!r}" if args.kind else ""))
        return 0
    table = [{"run": f"{r['kind']}-{r['key']}", "status": r["status"],
              "cells": f"{r['cells_done']}/{r['cells_total'] if r['cells_total'] is not None else '?'}",
              "created": _short_time(r["created"]), "updated": _short_time(r["updated"]),
              "metrics": _metrics_summary(r["metrics"])} for r in rows]
    print(format_table(table, ["run", "status", "cells", "created", "updated", "metrics"]))
    return 0


def cmd_show(args) -> int:
    store = ResultsStore(args.out)
    run = store.get(args.key)
    done, damaged = run.inspect()
    total = run.cells_total
    print(format_table([
        {"field": "run", "value": run.name},
        {"field": "path", "value": str(run.path)},
        {"field": "status", "value": run.status},
        {"field": "error", "value": run.error},
        {"field": "created", "value": _short_time(run.created)},
        {"field": "cells", "value": f"{len(done)}/{total if total is not None else '?'}"
                                    + (f" ({len(damaged)} damaged: see store verify)" if damaged else "")},
        {"field": "arrays", "value": ", ".join(run.array_names())},
        {"field": "predictions", "value": f"{len(run.read_predictions())} rows"},
    ], ["field", "value"]))
    print("\nconfig:")
    print(yaml.safe_dump(run.config, sort_keys=True, default_flow_style=False).rstrip())
    metrics = run.metrics()
    print("\nmetrics:")
    print(json.dumps(metrics, indent=2) if metrics is not None else "(none yet)")
    return 0


def _show_problems(problems) -> None:
    print(format_table([{"run": p.run, "problem": p.what, "file": p.file,
                         "detail": p.reason if len(p.reason) <= 160 else p.reason[:157] + "..."}
                        for p in problems], ["run", "problem", "file", "detail"]))


def cmd_delete(args) -> int:
    store = ResultsStore(args.out)
    for key in args.keys:
        store.delete(key)
        print(f"deleted {key}")
    return 0


def cmd_reindex(args) -> int:
    store = ResultsStore(args.out)
    for repair in store.repairs:
        print(repair)
    n = store.reindex()
    print(f"indexed {n} run(s) in {store.index_path}")
    problems = store.verify()
    if problems:
        print(f"{len(problems)} problem(s); runs with damaged or missing cells are listed as "
              "incomplete (`store verify --repair`, then run their jobs again):")
        _show_problems(problems)
    return 1 if problems else 0


def cmd_verify(args) -> int:
    store = ResultsStore(args.out)
    problems = store.verify(repair=args.repair)
    runs = len(store.scan()[0])
    if not problems:
        print(f"verified {runs} run(s) in {store.root}: every cell matches its checksum")
        return 0
    _show_problems(problems)
    if args.repair:
        print(f"repaired: damaged files moved aside (*.damaged), {len({p.run for p in problems})} "
              "run(s) marked incomplete; run their jobs or commands again to compute exactly "
              "the missing cells and rebuild their metrics.")
    else:
        print(f"{len(problems)} problem(s) in {runs} run(s); `store verify --repair --out "
              f"{args.out}` moves the damaged files aside so the next run recomputes them.")
    return 1


def _guard(func):
    """Store errors are user errors: print the message (it says what to do), exit 2."""
    def wrapped(args) -> int:
        try:
            return func(args)
        except StoreError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    wrapped.__name__ = func.__name__
    return wrapped


def add_store_commands(subparsers) -> argparse.ArgumentParser:
    """Add `store list|show|delete|reindex` to an argparse subparsers object; each leaf sets
    `func(args) -> exit code`. Returns the `store` parser."""
    store = subparsers.add_parser("store", help="list, inspect, delete or reindex stored runs",
                                  description="Inspect the results store (runs, cells, metrics).")
    sub = store.add_subparsers(dest="store_command", metavar="{list,show,delete,reindex,verify}")
    sub.required = True

    def leaf(name: str, help_text: str, func):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--out", default=DEFAULT_OUT,
                       help=f"results folder (default: {DEFAULT_OUT}/)")
        p.set_defaults(func=_guard(func))
        return p

    p = leaf("list", "list runs, newest first", cmd_list)
    p.add_argument("--kind", default=None, help="only runs of this kind (needle, suite, ppl, ...)")
    p.add_argument("--limit", type=int, default=200, help="at most this many rows (default 200)")
    p = leaf("show", "show one run: status, cells, config, metrics", cmd_show)
    p.add_argument("key", help="run key (16 hex digits) or <kind>-<key>")
    p = leaf("delete", "delete runs (their folders and index rows)", cmd_delete)
    p.add_argument("keys", nargs="+", help="run keys (16 hex digits) or <kind>-<key>")
    leaf("reindex", "rebuild index.sqlite from the run folders (exit 1 on any problem)", cmd_reindex)
    p = leaf("verify", "check every cell's checksum, missing cells and metrics (exit 1 on any "
                       "problem)", cmd_verify)
    p.add_argument("--repair", action="store_true",
                   help="move damaged files aside and mark their runs incomplete, so running "
                        "the same job again recomputes exactly those cells")
    return store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.cli.store")
    add_store_commands(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "store":
        argv.insert(0, "store")  # `python -m analysis.cli.store list` == `... store list`
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
