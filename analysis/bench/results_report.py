"""docs/RESULTS.md from a results store: the needle grids, the continuation NLL and the suite of every
run of one model, with the configurations tried and their commands.

    python -m analysis.bench.results_report --store assets/results --model /tmp/m/model \\
        --model <the 0.5B GGUF path> --findings docs/results-findings.md --out docs/RESULTS.md

The findings (what the numbers say, written by a person) come first and stay hand-written; every
table after them is computed here from the stored cells (unfinished runs included, marked so).

The summary pools a configuration's samples over every run that holds it. Samples are seeded by
(base seed, needle or task, length, sample index), not by run, so two runs share their first
samples: a sample counts once (the newest run's cell), or a grid rerun with more samples would
count its first ones twice and narrow the intervals falsely.
"""
from __future__ import annotations

import argparse
import datetime
import os
from collections import Counter, defaultdict
from pathlib import Path

from analysis.api.params import NeedleParams, PplParams, SuiteParams
from analysis.bench.common import write_fragment
from analysis.results.store import ResultsStore
from analysis.tasks.needle import needle_markdown, needle_metrics
from analysis.tasks.ppl import ppl_metrics
from analysis.tasks.suite import suite_markdown, suite_metrics


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
    if kind == "suite":
        return suite_metrics(run.records(), SuiteParams(**config["params"]), name)
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


def default_label() -> str:
    """The label FAEDKVPress()'s configuration (analysis.api.params.FAEDKV_DEFAULT) has in the store."""
    from analysis.api.params import FAEDKV_DEFAULT, MethodSpec
    from analysis.harness.methods import method_label

    return base_label(method_label(MethodSpec(name="faedkv", compression_ratio=0.5, params=FAEDKV_DEFAULT)))


def base_label(label: str) -> str:
    """A configuration's label without its ratio ("kvzip@0.75" -> "kvzip")."""
    return label.rsplit("@", 1)[0]


def distinct_samples(runs: list, key) -> list[dict]:
    """The cells of `runs` (oldest first), one per sample: key(record) names a sample, and a newer
    run's cell replaces an older one's (see the module docstring)."""
    kept: dict = {}
    for run in runs:
        for record in run.records():
            kept[key(record)] = record
    return list(kept.values())


def needle_sample(record: dict) -> tuple:
    return (record["label"], record["length"], float(record["depth"]), record["seed"], record.get("needle"),
            record.get("query_mode"))


def suite_sample(record: dict) -> tuple:
    return (record["label"], record["task"], record["seed"], record.get("context_tokens"), record.get("query_mode"))


def found_by_config(needle_records: list[dict], *extra: str) -> dict:
    """(configuration, ratio, *extra fields) -> [found, samples] over the records."""
    found: dict = defaultdict(lambda: [0.0, 0])
    for r in needle_records:
        cell = found[(base_label(r["label"]), r["ratio"], *(r[k] for k in extra))]
        cell[0] += r["exact"]
        cell[1] += 1
    return found


def summary_table(needle_records: list[dict], ppls: list[dict]) -> str:
    """One row per configuration: needle found [95% CI] and NLL increase at each ratio, from
    the distinct needle samples of every run and the given ppl runs' metrics."""
    from analysis.tasks.scoring import wilson_interval

    found = found_by_config(needle_records)
    nll: dict = {}
    for metrics in ppls:
        for m in metrics["by_method"]:
            nll[(base_label(m["label"]), m["ratio"])] = m["delta_nll"]
    needle_ratios = sorted({r for _, r in found if r})
    nll_ratios = sorted({r for _, r in nll if r})
    configs = list(dict.fromkeys(["full"] + [c for c, _ in found] + [c for c, _ in nll]))
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


def depth_summary(needle_records: list[dict]) -> str:
    """Found / samples per depth (lengths pooled), one row per configuration and ratio, over the
    distinct samples of every run: the position-agnostic claim for every configuration at once."""
    found = found_by_config(needle_records, "depth")
    depths = sorted({d for *_, d in found})
    rows = sorted({(c, r) for c, r, _ in found}, key=lambda row: (row[0] != "full", row))
    lines = ["| configuration | ratio | " + " | ".join(f"depth {d:g}%" for d in depths) + " |",
             "|---|---:|" + "---|" * len(depths)]
    for config, ratio in rows:
        cells = [found.get((config, ratio, d)) for d in depths]
        lines.append(f"| {config} | {ratio:g} | " + " | ".join(
            f"{100 * c[0] / c[1]:.0f}% ({c[0]:g}/{c[1]})" if c and c[1] else "-" for c in cells) + " |")
    return "\n".join(lines)


def suite_scores(suite_records: list[dict]) -> dict:
    """(configuration, ratio, task) -> the scores of its samples, in record order."""
    scores: dict = defaultdict(list)
    for r in suite_records:
        scores[(base_label(r["label"]), r["ratio"], r["task"])].append(r["score"])
    return scores


def suite_runs_by_length(suite_runs: list) -> dict:
    """context length -> the suite runs at it, shortest first (scores compare only at one length)."""
    by_length: dict = defaultdict(list)
    for run in suite_runs:
        by_length[SuiteParams(**run.config["params"]).context_length].append(run)
    return dict(sorted(by_length.items()))


def suite_summary(suite_records: list[dict]) -> str:
    """Mean score per task and over all samples (95% interval), one row per configuration and
    ratio, over the distinct samples of every suite run of one context length. A row that lacks
    some of the tasks (an unfinished run) says so next to its mean: its tasks differ in difficulty,
    so that mean does not compare with a full row's."""
    from analysis.tasks.scoring import mean_interval

    scores = suite_scores(suite_records)
    tasks = list(dict.fromkeys(t for *_, t in scores))
    rows = list(dict.fromkeys((c, ratio) for c, ratio, _ in scores))
    lines = ["| configuration | ratio | " + " | ".join(tasks) + " | all samples [95% CI] | n |",
             "|---|---:|" + "---:|" * len(tasks) + "---|---:|"]
    for config, ratio in rows:
        per_task = [scores.get((config, ratio, t), []) for t in tasks]
        every = [x for task_scores in per_task for x in task_scores]
        mean, low, high = mean_interval(every)
        covered = sum(1 for v in per_task if v)
        partial = f", only {covered} of {len(tasks)} tasks" if covered < len(tasks) else ""
        lines.append(f"| {config} | {ratio:g} | " + " | ".join(
            f"{sum(v) / len(v):.2f}" if v else "-" for v in per_task)
            + f" | {mean:.2f} [{low:.2f}, {high:.2f}]{partial} | {len(every)} |")
    return "\n".join(lines)


# The search's goal (issue 15): needle found at 0.5 and at every depth at 0.75, NLL increase at 0.5, suite at 0.5
GOAL_NEEDLE_HALF, GOAL_DEPTH_THREE_QUARTERS, GOAL_NLL_HALF = 0.8, 0.5, 0.02


def is_baseline(config: str) -> bool:
    """A registry baseline (kvpress's presses, dct_iterative), not FAEDKV and not the full cache."""
    return config != "full" and not config.startswith("faedkv")


def suite_means(suite_records: list[dict]) -> dict:
    """(configuration, ratio) -> mean score over every sample of the suite records of one context
    length, for rows that cover every task measured there (a partial row does not compare)."""
    scores = suite_scores(suite_records)
    tasks = {task for *_, task in scores}
    rows: dict = defaultdict(list)
    for (config, ratio, task), values in scores.items():
        rows[(config, ratio)].append((task, values))
    return {key: sum(sum(v) for _, v in per_task) / sum(len(v) for _, v in per_task)
            for key, per_task in rows.items() if {t for t, _ in per_task} == tasks}


def goal_check(needle_records: list[dict], ppls: list, suite_runs: list) -> str:
    """Issue 15's goal, condition by condition, for every FAEDKV configuration with a needle at
    0.5 or 0.75: found at 0.5 >= 80%; at 0.75 >= 50% at every depth (lengths pooled); NLL at 0.5
    within +0.02 (the ppl run that measured it on the most texts); suite at 0.5 not below the best
    baseline's at the longest context both were run at (complete rows only); and ahead of the
    strongest baseline at some ratio with Wilson 95% intervals apart. '-': not measured. Rows: the
    most conditions met first."""
    from analysis.tasks.scoring import wilson_interval

    found = found_by_config(needle_records)
    by_depth = found_by_config(needle_records, "depth")
    nll: dict = {}                     # config -> (texts, delta) of the run that measured it on the most texts
    for _, metrics in ppls:
        for m in metrics["by_method"]:
            config = base_label(m["label"])
            if m["ratio"] == 0.5 and m.get("delta_nll") is not None and m["n"] > nll.get(config, (0, None))[0]:
                nll[config] = (m["n"], m["delta_nll"])
    suites = {}                        # (config, ratio, context length) -> mean score
    for length, runs in suite_runs_by_length(suite_runs).items():
        suites.update({(config, ratio, length): score for (config, ratio), score
                       in suite_means(distinct_samples(runs, suite_sample)).items()})
    configs = sorted({c for c, r in found if c.startswith("faedkv") and r in (0.5, 0.75)})
    strongest = {}                     # ratio -> (baseline, found, n) with the most found
    for (config, ratio), (hits, n) in found.items():
        if is_baseline(config) and n and (ratio not in strongest or hits / n > strongest[ratio][1] / strongest[ratio][2]):
            strongest[ratio] = (config, hits, n)

    DEFAULT_LABEL = default_label()

    def mark(ok: bool, text: str) -> str:
        return f"{'yes' if ok else '**no**'}: {text}"

    lines = ["| configuration | needle @0.5 >= 80% | every depth @0.75 >= 50% | NLL @0.5 <= +0.02 "
             "| suite @0.5 >= best baseline | ahead of the strongest baseline, intervals apart | conditions met |",
             "|---|---|---|---|---|---|---:|"]
    rows = []
    for config in configs:
        cells = []
        hits, n = found.get((config, 0.5), (0, 0))
        cells.append(mark(hits / n >= GOAL_NEEDLE_HALF, f"{100 * hits / n:.0f}% of {n}") if n else "-")
        depths = [(d, c) for (cfg, r, d), c in by_depth.items() if cfg == config and r == 0.75 and c[1]]
        if depths:
            worst, (w_hits, w_n) = min(depths, key=lambda item: item[1][0] / item[1][1])
            cells.append(mark(w_hits / w_n >= GOAL_DEPTH_THREE_QUARTERS,
                              f"lowest {100 * w_hits / w_n:.0f}% ({w_hits:g}/{w_n}) at depth {worst:g}"))
        else:
            cells.append("-")
        if config in nll:
            texts, delta = nll[config]
            cells.append(mark(delta <= GOAL_NLL_HALF, f"{delta:+.4f} ({texts} texts)"))
        else:
            cells.append("-")
        shared = [length for (cfg, ratio, length) in suites if cfg == config and ratio == 0.5
                  and any(is_baseline(b) and r == 0.5 and l == length for b, r, l in suites)]
        if shared:
            length = max(shared)
            best_score, best = max((score, b) for (b, r, l), score in suites.items()
                                   if is_baseline(b) and r == 0.5 and l == length)
            score = suites[(config, 0.5, length)]
            cells.append(mark(score >= best_score, f"{score:.2f} against {best} {best_score:.2f} at {length}"))
        else:
            cells.append("-")
        gaps = []
        for ratio, (baseline, b_hits, b_n) in sorted(strongest.items()):
            hits, n = found.get((config, ratio), (0, 0))
            if n:
                low = wilson_interval(hits, n)[0]
                high = wilson_interval(b_hits, b_n)[1]
                gaps.append((low - high, ratio, baseline, low, high))
        if gaps:
            gap, ratio, baseline, low, high = max(gaps)
            cells.append(mark(gap > 0, f"at {ratio:g}: [{100 * low:.1f}, ...] against {baseline}'s [..., {100 * high:.1f}]"))
        else:
            cells.append("-")
        met = sum(cell.startswith("yes") for cell in cells)
        name = f"**{config}** (FAEDKV's default)" if config == DEFAULT_LABEL else config
        rows.append((-met, config, f"| {name} | " + " | ".join(cells) + f" | {met} of 5 |"))
    return "\n".join(lines + [line for *_, line in sorted(rows)])


GOAL_NOTE = ("The search's goal (issue 15), condition by condition, for every FAEDKV configuration with a needle at "
             "0.5 or 0.75. Needle: distinct samples pooled over runs and lengths; NLL: the run that measured the "
             "configuration at 0.5 on the most texts; suite: the mean over every task's samples against the best "
             "baseline at the longest context both ran (rows missing a task left out); apart: the configuration's "
             "Wilson 95% lower bound above the strongest baseline's upper bound, at the ratio where the gap is "
             "largest. '-': not measured.")


def goal_section(needle_records: list[dict], ppls: list, suite_runs: list) -> list[str]:
    """The goal table under its heading and note; nothing without needle records."""
    if not needle_records:
        return []
    return ["### The search's goal, condition by condition", GOAL_NOTE, goal_check(needle_records, ppls, suite_runs)]


def run_header(run, metrics: dict) -> str:
    cells, total = metrics["cells"], run.cells_total
    state = "complete" if total is None or cells >= total else f"UNFINISHED: {cells} of {total} cells"
    params = run.config["params"]
    return (f"Run `{run.name}` ({state}); model `{run.config.get('model', {}).get('name')}` "
            f"({run.config.get('model', {}).get('revision')}); parameters: "
            + ", ".join(f"{k}={v}" for k, v in params.items() if k != "methods"))


SUMMARY_NOTE = ("Needle: found / samples over every stored run of the configuration (lengths and depths "
                "pooled; a sample shared by two runs counts once), Wilson 95% interval; NLL: mean increase over "
                "the full cache, continuation after a compressed prefix (the ppl run's parameters below). "
                "'-': not run.")


def report(store_root: str, models: list[str | None], findings: str | None) -> str:
    parts = [f"<!-- written by `python -m analysis.bench.results_report` on {datetime.date.today()}; "
             "edit the findings file, not this one -->"]
    if findings:
        parts.append(Path(findings).read_text().strip())
    for model in models:
        parts += model_section(ResultsStore(store_root, read_only=True), model)
    return "\n\n".join(parts) + "\n"


def suite_sections(suites: list) -> list[str]:
    """The suite summary per context length (scores compare only at one length)."""
    parts = []
    for length, runs in suite_runs_by_length(suites).items():
        parts += [f"### Suite at {length} tokens: every configuration tried",
                  f"Mean score of the suite's tasks over every stored run at {length} tokens (a sample shared by "
                  f"two runs counts once), and over all samples with a normal 95% interval; runs: "
                  + ", ".join(f"`{run.name}`" for run in runs) + ".",
                  suite_summary(distinct_samples(runs, suite_sample))]
    return parts


def model_section(store: ResultsStore, model: str | None) -> list[str]:
    needle_runs = model_runs(store, "needle", model)
    needles = [(run, run_metrics(run, "needle")) for run in needle_runs]
    ppls = [(run, run_metrics(run, "ppl")) for run in model_runs(store, "ppl", model)]
    suites = model_runs(store, "suite", model)
    reference, note = reference_ppls(ppls)
    samples = distinct_samples(needle_runs, needle_sample)
    depths = ["Needle found per depth, every configuration (lengths pooled, distinct samples of every run):",
              depth_summary(samples)] if samples else []
    parts = [f"## {model or 'Every model'}: every configuration tried", SUMMARY_NOTE + (" " + note if note else ""),
             summary_table(samples, [m for _, m in reference]), *goal_section(samples, ppls, suites), *depths,
             *suite_sections(suites),
             "### Tables from the store"]
    for run, metrics in needles:
        parts += [f"#### Needle: {run.name}", run_header(run, metrics), needle_markdown(metrics, detail=True),
                  "Accuracy per depth (both lengths):", depth_profile(metrics)]
    for run, metrics in ppls:
        parts += [f"#### Continuation NLL: {run.name}", run_header(run, metrics),
                  f"NLL of {metrics['continuation_tokens']} tokens after a {metrics['prefix_tokens']}-token "
                  f"compressed prefix; full cache {metrics['nll_full']:.4f}. Increase over full, mean of "
                  f"{PplParams(**run.config['params']).num_texts} texts:", nll_against_ratio(metrics)]
    for run in suites:
        metrics = run_metrics(run, "suite")
        parts += [f"#### Suite: {run.name}", run_header(run, metrics), suite_markdown(metrics)]
    return parts


def fragment(store_root: str, model: str | None, machine: str, path: str) -> None:
    store = ResultsStore(store_root, read_only=True)
    samples = distinct_samples(model_runs(store, "needle", model), needle_sample)
    ppls = [(run, run_metrics(run, "ppl")) for run in model_runs(store, "ppl", model)]
    suites = model_runs(store, "suite", model)
    reference, note = reference_ppls(ppls)
    write_fragment(path, "\n\n".join([
        f"### Quality on a real model: {model or 'every model'} ({datetime.date.today()})",
        f"Machine: {machine}. Commands: the parts of `benchmarks/gpu_quality.sh` (docs/RESULTS.md "
        "lists each run with its command), tables by `python -m analysis.bench.results_report`.",
        SUMMARY_NOTE + (" " + note if note else ""), summary_table(samples, [m for _, m in reference]),
        *goal_section(samples, ppls, suites), *suite_sections(suites)]) + "\n")


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
