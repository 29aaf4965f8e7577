"""docs/RESULTS.md from a results store: the needle grids and the continuation NLL of every run of
one model, with the configurations tried and their commands.

    python -m analysis.bench.results_report --store assets/results --model /tmp/m/model \\
        --model <the 0.5B GGUF path> --findings docs/results-findings.md --out docs/RESULTS.md

The findings (what the numbers say, written by a person) come first and stay hand-written; every
table after them is computed here from the stored cells (unfinished runs included, marked so).
"""
from __future__ import annotations

import argparse
import datetime
import os
from collections import Counter, defaultdict
from pathlib import Path

from analysis.api.params import NeedleParams, PplParams
from analysis.bench.common import write_fragment
from analysis.results.store import ResultsStore
from analysis.tasks.needle import needle_markdown, needle_metrics
from analysis.tasks.ppl import ppl_metrics


def model_runs(store: ResultsStore, kind: str, model: str | None) -> list:
    rows = [r for r in store.runs(kind, limit=10_000)
            if model is None or r["config"].get("model", {}).get("name") == model]
    return [store.get(r["key"]) for r in sorted(rows, key=lambda r: r["created"])]


def run_metrics(run, kind: str) -> dict:
    """The stored metrics, or metrics recomputed from the finished cells of an unfinished run."""
    config = run.config
    name = config.get("model", {}).get("name", "")
    if kind == "needle":
        return needle_metrics(run.records(), NeedleParams(**config["params"]), name)
    return ppl_metrics(run.records(), PplParams(**config["params"]), name)


def texts_of(run) -> tuple:
    """What a ppl run's NLL is measured on: (prefix tokens, continuation tokens, texts, seed).
    NLL differences compare only within one such set."""
    params = PplParams(**run.config["params"])
    return params.prefix_tokens, params.continuation_tokens, params.num_texts, params.seed


def reference_ppls(ppls: list) -> tuple[list, str]:
    """The ppl runs [(run, metrics)] on the reference texts (the set most runs used; ties: the
    earliest), for the summary table, and a sentence naming that set and what was left out."""
    if not ppls:
        return [], ""
    # most_common keeps first-seen order among equal counts, and ppls come oldest first
    reference = Counter(texts_of(run) for run, _ in ppls).most_common(1)[0][0]
    kept = [(run, m) for run, m in ppls if texts_of(run) == reference]
    others = [run.name for run, _ in ppls if texts_of(run) != reference]
    prefix, continuation, texts, seed = reference
    note = (f"NLL columns: the runs on one set of texts ({continuation} tokens after a {prefix}-token prefix, "
            f"{texts} texts, seed {seed})")
    note += f"; runs on other texts are in their own tables below: {', '.join(f'`{n}`' for n in others)}." if others else "."
    return kept, note


def depth_profile(metrics: dict) -> str:
    """Accuracy per needle depth (lengths pooled), one row per method: the position-agnostic claim."""
    pooled: dict = defaultdict(lambda: [0.0, 0])
    for r in metrics["by_cell"]:
        cell = pooled[(r["label"], r["depth"])]
        cell[0] += r["correct"]
        cell[1] += r["n"]
    depths = sorted({d for _, d in pooled})
    labels = [m["label"] for m in metrics["by_method"]]
    lines = ["| method | " + " | ".join(f"depth {d:g}%" for d in depths) + " |",
             "|---|" + "---|" * len(depths)]
    for label in labels:
        cells = [pooled.get((label, d)) for d in depths]
        lines.append(f"| {label} | " + " | ".join(
            f"{100 * c[0] / c[1]:.0f}% ({c[0]:g}/{c[1]})" if c and c[1] else "-" for c in cells) + " |")
    return "\n".join(lines)


def nll_against_ratio(metrics: dict) -> str:
    """NLL increase over the full cache, one row per configuration, one column per ratio."""
    by_config: dict = defaultdict(dict)
    for m in metrics["by_method"]:
        if m["label"] == "full":
            continue
        base = m["label"].rsplit("@", 1)[0]
        by_config[base][m["ratio"]] = m["delta_nll"]
    ratios = sorted({r for row in by_config.values() for r in row})
    lines = ["| configuration | " + " | ".join(f"ratio {r:g}" for r in ratios) + " |",
             "|---|" + "---:|" * len(ratios)]
    for base, row in by_config.items():
        lines.append(f"| {base} | " + " | ".join(
            "-" if row.get(r) is None else f"{row[r]:+.3f}" for r in ratios) + " |")
    return "\n".join(lines)


def summary_table(needles: list[dict], ppls: list[dict]) -> str:
    """One row per configuration: needle found [95% CI] and NLL increase at each ratio, from
    every needle and ppl run given (a configuration's cells pooled across runs)."""
    from analysis.tasks.scoring import wilson_interval

    found: dict = defaultdict(lambda: [0.0, 0])
    nll: dict = {}
    for metrics in needles:
        for m in metrics["by_method"]:
            cell = found[(m["label"].rsplit("@", 1)[0], m["ratio"])]
            cell[0] += m["correct"]
            cell[1] += m["n"]
    for metrics in ppls:
        for m in metrics["by_method"]:
            nll[(m["label"].rsplit("@", 1)[0], m["ratio"])] = m["delta_nll"]
    needle_ratios = sorted({r for _, r in found if r})
    nll_ratios = sorted({r for _, r in nll if r})
    configs = list(dict.fromkeys([c for c, _ in found] + [c for c, _ in nll]))
    head = (["configuration"] + [f"needle @{r:g}" for r in needle_ratios]
            + [f"NLL - full @{r:g}" for r in nll_ratios])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---|" * (len(head) - 1)]
    for config in configs:
        if config == "full":
            cell = found.get(("full", 0.0))
            text = f"{cell[0]:g}/{cell[1]} found" if cell else "-"
            lines.append(f"| full (ratio 0) | {text} |" + " |" * (len(head) - 2))
            continue
        row = [config]
        for r in needle_ratios:
            cell = found.get((config, r))
            if cell and cell[1]:
                low, high = wilson_interval(cell[0], cell[1])
                row.append(f"{100 * cell[0] / cell[1]:.0f}% [{100 * low:.0f}, {100 * high:.0f}] of {cell[1]}")
            else:
                row.append("-")
        row += ["-" if nll.get((config, r)) is None else f"{nll[(config, r)]:+.3f}" for r in nll_ratios]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def run_header(run, metrics: dict) -> str:
    cells, total = metrics["cells"], run.cells_total
    state = "complete" if total is None or cells >= total else f"UNFINISHED: {cells} of {total} cells"
    params = run.config["params"]
    return (f"Run `{run.name}` ({state}); model `{run.config.get('model', {}).get('name')}` "
            f"({run.config.get('model', {}).get('revision')}); parameters: "
            + ", ".join(f"{k}={v}" for k, v in params.items() if k != "methods"))


SUMMARY_NOTE = ("Needle: found / samples pooled over every stored run of the configuration (lengths and "
                "depths), Wilson 95% interval; NLL: mean increase over the full cache, continuation after a "
                "compressed prefix (the ppl run's parameters below). '-': not run.")


def report(store_root: str, models: list[str | None], findings: str | None) -> str:
    parts = [f"<!-- written by `python -m analysis.bench.results_report` on {datetime.date.today()}; "
             "edit the findings file, not this one -->"]
    if findings:
        parts.append(Path(findings).read_text().strip())
    for model in models:
        parts += model_section(ResultsStore(store_root, read_only=True), model)
    return "\n\n".join(parts) + "\n"


def model_section(store: ResultsStore, model: str | None) -> list[str]:
    needles = [(run, run_metrics(run, "needle")) for run in model_runs(store, "needle", model)]
    ppls = [(run, run_metrics(run, "ppl")) for run in model_runs(store, "ppl", model)]
    reference, note = reference_ppls(ppls)
    parts = [f"## {model or 'Every model'}: every configuration tried", SUMMARY_NOTE + (" " + note if note else ""),
             summary_table([m for _, m in needles], [m for _, m in reference]), "### Tables from the store"]
    for run, metrics in needles:
        parts += [f"#### Needle: {run.name}", run_header(run, metrics), needle_markdown(metrics, detail=True),
                  "Accuracy per depth (both lengths):", depth_profile(metrics)]
    for run, metrics in ppls:
        parts += [f"#### Continuation NLL: {run.name}", run_header(run, metrics),
                  f"NLL of {metrics['continuation_tokens']} tokens after a {metrics['prefix_tokens']}-token "
                  f"compressed prefix; full cache {metrics['nll_full']:.4f}. Increase over full, mean of "
                  f"{PplParams(**run.config['params']).num_texts} texts:", nll_against_ratio(metrics)]
    return parts


def fragment(store_root: str, model: str | None, machine: str, path: str) -> None:
    store = ResultsStore(store_root, read_only=True)
    needles = [run_metrics(run, "needle") for run in model_runs(store, "needle", model)]
    reference, note = reference_ppls([(run, run_metrics(run, "ppl")) for run in model_runs(store, "ppl", model)])
    write_fragment(path, "\n\n".join([
        f"### Quality on a real model: {model or 'every model'} ({datetime.date.today()})",
        f"Machine: {machine}. Commands: the parts of `benchmarks/gpu_quality.sh` (docs/RESULTS.md "
        "lists each run with its command), tables by `python -m analysis.bench.results_report`.",
        SUMMARY_NOTE + (" " + note if note else ""), summary_table(needles, [m for _, m in reference])]) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.bench.results_report", description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="results", help="results store (folder with runs/)")
    parser.add_argument("--model", action="append", default=None,
                        help="only runs of this model name (as stored); repeat for several, one section each")
    parser.add_argument("--findings", default=None, help="hand-written findings (markdown) to put first")
    parser.add_argument("--out", default="docs/RESULTS.md")
    parser.add_argument("--fragment", default=None,
                        help="also write the summary table as a BENCHMARKS.md fragment here")
    parser.add_argument("--machine", default="", help="the machine the runs ran on (for the fragment)")
    args = parser.parse_args(argv)
    if not (Path(args.store) / "runs").is_dir():
        raise SystemExit(f"{args.store} has no runs/ folder: point --store at a results store")
    models = args.model or [None]
    text = report(args.store, models, args.findings)
    if args.fragment:
        fragment(args.store, models[0], args.machine, args.fragment)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
