"""Needle in a haystack over the Paul Graham essays: lengths x depths x methods x samples.

    key = run_needle(loaded, ResultsStore("results"), NeedleParams(
        methods=[MethodSpec(name="snapkv", compression_ratio=0.75)], lengths=[1024, 2048],
        depths=[0, 50, 100], samples=5))
    print(needle_markdown(store.get(key)))

Needles (inserted on a sentence boundary at the depth, as the original needlehaystack tester):
- "sentence": "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a
  sunny day.", asked "What is the best thing to do in San Francisco?" with the answer prefix
  "The best thing to do in San Francisco is"; the expected answer is the rest of the needle.
- "passkey": "The pass key is NNNNN. Remember it. NNNNN is the pass key." (random 5 digits),
  asked "What is the pass key?" with the prefix "The pass key is".
- "multi": k needles "The special magic number for <word> is <7 digits>." (distinct words from
  the essays); the first at the depth, the others evenly spaced after it (the multi-needle
  tester's rule); all k numbers are asked for; the sample is correct when all are recalled.

`length` is the document's token count (haystack with needles, SmolLM2 tokens as tokenized on
their own); the chat template adds about 30 tokens, recorded per cell as `prompt_tokens`.

Samples: cell (method, length, depth, sample) uses the seed stable_seed(params.seed, needle,
length, sample): the haystack offset and the needle values differ per sample and length, are
the same for every method (so accuracies compare on the same samples) and the same across
depths (a row of depths moves one needle through one haystack).

Scores per cell: exact (the expected answer occurs in the prediction, normalized; multi: all
numbers recalled), partial (fraction of the expected answer's words found; multi: fraction of
numbers recalled), ROUGE-L F1 against the expected answer.

Metrics (metrics.json): per (method, length, depth), per (method, length) and per method: n,
correct, accuracy with its 95% Wilson interval, mean partial and ROUGE-L, and the comparison
with the full cache on the same samples: `full_correct` (samples full got right),
`acc_given_full` (the method's accuracy on those samples) and `rel_to_full` (accuracy /
full's accuracy).
"""
from __future__ import annotations

import dataclasses
import random

import numpy as np

from analysis.api.params import MethodSpec, NeedleParams
from analysis.harness import haystack
from analysis.tasks import JobKind, run_grid, stable_seed, unique_labels, with_full
from analysis.tasks.scoring import exact_match, partial_match, recall, rouge_l, wilson_interval

SENTENCE_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
SENTENCE_QUESTION = "What is the best thing to do in San Francisco?"
SENTENCE_PREFIX = "The best thing to do in San Francisco is"
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key?"
PASSKEY_PREFIX = "The pass key is"
MULTI_NEEDLE = "The special magic number for {key} is {value}."


@dataclasses.dataclass(frozen=True)
class NeedleSample:
    kind: str
    context: str                        # the document: haystack with the needle(s) inserted
    question: str
    answer_prefix: str
    answers: tuple[str, ...]            # what the prediction must contain (all of them)
    needles: tuple[str, ...]            # the needle sentences
    needle_positions: tuple[int, ...]   # token index of each needle in the document
    context_tokens: int
    seed: int

    @property
    def needle_text(self) -> str:
        return " ".join(self.needles)

    @property
    def expected(self) -> str:
        return ", ".join(self.answers)


def _line(text: str) -> str:
    # The original tester's needle is a line of its own ("\n<needle>\n").
    return f"\n{text}\n"


def _join_words(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def make_sample(tokenizer, kind: str, length: int, depth: float, seed: int,
                num_needles: int = 3) -> NeedleSample:
    """The needle sample of `kind` with a `length`-token document, the needle at `depth`
    percent, haystack offset and needle values from `seed`."""
    rng = random.Random(seed)
    if kind == "sentence":
        needles, answers = [SENTENCE_NEEDLE], [SENTENCE_NEEDLE[len(SENTENCE_PREFIX):].strip()]
        question, prefix, depths = SENTENCE_QUESTION, SENTENCE_PREFIX, [depth]
    elif kind == "passkey":
        key = str(rng.randint(10000, 99999))
        needles, answers = [PASSKEY_NEEDLE.format(key=key)], [key]
        question, prefix, depths = PASSKEY_QUESTION, PASSKEY_PREFIX, [depth]
    elif kind == "multi":
        if num_needles < 1:
            raise ValueError(f"num_needles must be at least 1, got {num_needles}")
        keys = rng.sample(haystack.essay_words(), num_needles)
        values = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
        needles = [MULTI_NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
        answers = values
        names = _join_words(keys)
        question = f"What are the special magic numbers for {names}?"
        prefix = f"The special magic numbers for {names} are"
        step = (100 - depth) / num_needles
        depths = [depth + i * step for i in range(num_needles)]
    else:
        raise ValueError(f"unknown needle {kind!r}; use sentence, passkey or multi")
    base = haystack.haystack_tokens(tokenizer, length, offset_seed=seed)
    ids, starts = haystack.insert_needles(tokenizer, base, [_line(n) for n in needles], depths)
    context = tokenizer.decode(ids)
    return NeedleSample(kind, context, question, prefix, tuple(answers), tuple(needles),
                        tuple(starts), len(ids), seed)


def score(sample: NeedleSample, prediction: str) -> dict:
    """{"exact", "partial", "rouge_l"} of a prediction (the text generated after the prefix)."""
    if sample.kind == "multi":
        found = recall(prediction, list(sample.answers))
        exact, partial = float(found == 1.0), found
    else:
        exact = exact_match(prediction, sample.answers[0])
        partial = partial_match(prediction, sample.answers[0])
    return {"exact": exact, "partial": partial, "rouge_l": rouge_l(prediction, sample.expected)}


def logistic_depth(x: float, L: float = 100, x0: float = 50, k: float = 0.1) -> float:
    """The needlehaystack tester's sigmoid spacing: denser near 0 and 100."""
    if x in (0, 100):
        return float(x)
    return float(np.round(L / (1 + np.exp(k * (x - x0))), 3))


def needle_depths(params: NeedleParams) -> list[float]:
    """The depths of the grid: as given, or num_depths linearly / sigmoidally spaced in [0, 100]
    (the needlehaystack tester's two spacings)."""
    if params.depth_spacing == "given":
        depths = list(params.depths)
    elif params.depth_spacing == "linear":
        depths = [float(d) for d in np.round(np.linspace(0, 100, params.num_depths)).astype(int)]
    else:
        depths = sorted(logistic_depth(x) for x in np.linspace(0, 100, params.num_depths))
    out: list[float] = []
    for d in depths:
        if float(d) not in out:
            out.append(float(d))
    return out


def sample_seed(params: NeedleParams, length: int, sample: int) -> int:
    return stable_seed(params.seed, "needle", params.needle, length, sample)


def _fmt(x: float) -> str:
    return f"{x:g}"


def needle_cells(params: NeedleParams) -> list[dict]:
    """One cell per (length, depth, sample, method), methods innermost so a partial grid
    holds every method on the same samples."""
    labels = unique_labels(params.methods)
    cells = []
    for length in params.lengths:
        for depth in needle_depths(params):
            for s in params.sample_indices():
                seed = sample_seed(params, length, s)
                for spec, label in zip(params.methods, labels):
                    cells.append({
                        "id": f"{label}|len={length}|depth={_fmt(depth)}|sample={s}",
                        "method": spec.model_dump(mode="json"), "label": label,
                        "length": length, "depth": depth, "sample": s, "seed": seed})
    return cells


@dataclasses.dataclass
class NeedleCell:
    """cell -> record (picklable for Ray: holds a ModelHandle, not a model)."""
    handle: object
    params: NeedleParams

    def __call__(self, cell: dict) -> dict:
        from analysis.harness.generation import answer_details, reconstruction_errors
        from analysis.harness.methods import build_press

        loaded = self.handle.get()
        p = self.params
        spec = MethodSpec(**cell["method"])
        sample = make_sample(loaded.tokenizer, p.needle, cell["length"], cell["depth"],
                             cell["seed"], p.num_needles)
        press = build_press(spec, loaded.model)
        a = answer_details(loaded, press, sample.context, sample.question, p.max_new_tokens,
                           p.query_mode, sample.answer_prefix)
        return {
            "method": spec.name, "label": cell["label"], "ratio": spec.compression_ratio,
            "length": cell["length"], "depth": cell["depth"], "sample": cell["sample"],
            "seed": cell["seed"], "needle": p.needle, "query_mode": p.query_mode,
            "prediction": a.text, "expected": sample.expected, **score(sample, a.text),
            "prompt_tokens": a.prompt_tokens, "context_tokens": sample.context_tokens,
            "needle_positions": list(sample.needle_positions),
            "cache_lengths": a.cache_lengths, "expected_cache_lengths": a.expected_cache_lengths,
            "reconstruction_error": reconstruction_errors(press, len(a.cache_lengths)),
            "seconds": a.seconds,
        }


def normalized_params(params: NeedleParams) -> NeedleParams:
    """The params with "full" added (first): what the run is keyed on."""
    return params.model_copy(update={"methods": with_full(params.methods)})


def run_needle(model, store, params: NeedleParams, progress=None, should_stop=None,
               executor: str = "local", ray_address: str | None = None,
               show_progress: bool = True) -> str:
    """Run (or resume) the needle grid; writes predictions.csv and metrics.json; returns the
    run key."""
    params = normalized_params(params)
    return run_grid("needle", model, store, params, needle_cells(params),
                    lambda handle: NeedleCell(handle, params),
                    lambda rows, name: needle_metrics(rows, params, name),
                    desc=f"needle {params.needle}", progress=progress, should_stop=should_stop,
                    executor=executor, ray_address=ray_address, show_progress=show_progress)


# ---------------------------------------------------------------------------------- metrics


def _stats(rows: list[dict], full_by_sample: dict) -> dict:
    n = len(rows)
    correct = sum(r["exact"] for r in rows)
    lo, hi = wilson_interval(correct, n)
    full_right = [r for r in rows if full_by_sample.get(_sample_key(r), 0) == 1]
    full_acc = sum(full_by_sample.get(_sample_key(r), 0) for r in rows) / n if n else None
    acc = correct / n if n else None
    return {
        "n": n, "correct": correct, "accuracy": acc, "ci_low": lo, "ci_high": hi,
        "partial": sum(r["partial"] for r in rows) / n if n else None,
        "rouge_l": sum(r["rouge_l"] for r in rows) / n if n else None,
        "full_accuracy": full_acc,
        "full_correct": len(full_right),
        "acc_given_full": (sum(r["exact"] for r in full_right) / len(full_right)
                           if full_right else None),
        "rel_to_full": (acc / full_acc) if full_acc else None,
        "seconds": sum(r["seconds"] for r in rows) / n if n else None,
        "cache_length": (sum(sum(r["cache_lengths"]) / len(r["cache_lengths"]) for r in rows) / n
                         if n else None),
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows) / n if n else None,
    }


def _sample_key(row: dict) -> tuple:
    return (row["length"], float(row["depth"]), row["sample"])


def _grouped(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def needle_metrics(rows: list[dict], params: NeedleParams, model_name: str = "") -> dict:
    """Accuracy tables from the per-cell rows (see the module docstring)."""
    full_by_sample = {_sample_key(r): r["exact"] for r in rows if r["method"] == "full"}
    labels = unique_labels(params.methods)
    ratio_of = {label: m.compression_ratio for label, m in zip(labels, params.methods)}
    order = {label: i for i, label in enumerate(labels)}

    def table(keys):
        out = []
        for group, members in sorted(_grouped(rows, keys).items(),
                                     key=lambda kv: (order.get(kv[0][0], 99),) + kv[0][1:]):
            out.append({**dict(zip(keys, group)), "ratio": ratio_of.get(group[0]),
                        **_stats(members, full_by_sample)})
        return out

    by_method = table(("label",))
    full = next((m for m in by_method if m["label"] == "full"), None)
    return {
        "task": "needle", "needle": params.needle, "query_mode": params.query_mode,
        "model": model_name, "cells": len(rows),
        "accuracy_full": full["accuracy"] if full else None,
        "by_method": by_method,
        "by_length": table(("label", "length")),
        "by_cell": table(("label", "length", "depth")),
    }


def needle_table(run, level: str = "by_cell"):
    """The run's metrics as a pandas DataFrame: level "by_cell" (method x length x depth),
    "by_length" or "by_method"."""
    import pandas as pd

    metrics = run.metrics() if hasattr(run, "metrics") else run
    if not metrics or metrics.get("task") != "needle":
        raise ValueError("this run has no needle metrics (unfinished, or another task); finish "
                         "it with the same command, or pick a needle run")
    if level not in ("by_cell", "by_length", "by_method"):
        raise ValueError(f"unknown level {level!r}; use by_cell, by_length or by_method")
    return pd.DataFrame(metrics[level])


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def needle_markdown(run, detail: bool = False) -> str:
    """A markdown summary: one row per method with its correct/n per context length, overall
    accuracy [95% CI], accuracy on the samples full got right, accuracy relative to full, and
    ROUGE-L. With detail, one more table: correct/n per length and depth."""
    metrics = run.metrics() if hasattr(run, "metrics") else run
    by_method = needle_table(metrics, "by_method").to_dict("records")
    by_length = needle_table(metrics, "by_length").to_dict("records")
    lengths = sorted({r["length"] for r in by_length})
    cells = {(r["label"], r["length"]): r for r in by_length}
    head = (["method"] + [f"{n} tok" for n in lengths]
            + ["accuracy [95% CI]", "acc. where full right", "rel. to full", "ROUGE-L"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in by_method:
        row = [m["label"]]
        for n in lengths:
            c = cells.get((m["label"], n))
            row.append(f"{c['correct']:g}/{c['n']}" if c else "-")
        row += [f"{_pct(m['accuracy'])} [{_pct(m['ci_low'])}, {_pct(m['ci_high'])}]",
                f"{_pct(m['acc_given_full'])} of {m['full_correct']}", _pct(m["rel_to_full"]),
                f"{m['rouge_l']:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    title = (f"Needle ({metrics['needle']}, {metrics['query_mode']}, {metrics.get('model', '')}): "
             "correct / samples")
    out = [title, "", *lines]
    if detail:
        by_cell = needle_table(metrics, "by_cell").to_dict("records")
        cols = sorted({(r["length"], r["depth"]) for r in by_cell})
        grid = {(r["label"], r["length"], r["depth"]): r for r in by_cell}
        head = ["method"] + [f"{n}/{d:g}%" for n, d in cols]
        out += ["", "Per length / depth:", "", "| " + " | ".join(head) + " |",
                "|" + "---|" * len(head)]
        for m in by_method:
            row = [m["label"]] + [
                f"{grid[(m['label'], n, d)]['correct']:g}/{grid[(m['label'], n, d)]['n']}"
                if (m["label"], n, d) in grid else "-" for n, d in cols]
            out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


# -------------------------------------------------------------------------------------- CLI


def add_cli(subparsers) -> None:
    """`python -m analysis needle ...`"""
    from analysis import cli

    p = cli.add_task_parser(subparsers, "needle", "needle-in-a-haystack grid over the essays")
    p.add_argument("--lengths", type=cli.int_list, default=[1024, 2048, 4096],
                   help="document lengths in tokens (default 1024,2048,4096)")
    p.add_argument("--depths", type=cli.float_list, default=[0, 25, 50, 75, 100],
                   help="needle depths in percent (default 0,25,50,75,100)")
    p.add_argument("--depth-spacing", choices=("given", "linear", "sigmoid"), default="given",
                   help="given: --depths; linear/sigmoid: --num-depths spaced in [0, 100]")
    p.add_argument("--num-depths", type=int, default=5, help="depths for linear/sigmoid spacing")
    p.add_argument("--needle", choices=("sentence", "passkey", "multi"), default="sentence")
    p.add_argument("--num-needles", type=int, default=3, help="needles for --needle multi")
    p.set_defaults(func=_cli_main)


def _cli_main(args) -> int:
    from analysis import cli

    params = cli.build_params(NeedleParams, args, lengths=args.lengths, depths=args.depths,
                              depth_spacing=args.depth_spacing, num_depths=args.num_depths,
                              needle=args.needle, num_needles=args.num_needles)
    run, _ = cli.run_job(args, run_needle, params, "needle")
    return cli.print_run(run, needle_markdown(run, detail=True))


def _context(params: NeedleParams, tokenizer) -> tuple[int, str]:
    n = max(params.lengths)
    return n + params.max_new_tokens, (f"the longest of lengths ({n}) + max_new_tokens "
                                       f"({params.max_new_tokens})")


KIND = JobKind(
    name="needle", params=NeedleParams, run="analysis.tasks.needle:run_needle",
    context=_context,
    shortest=lambda p, tokenizer: (min(p.lengths), f"the shortest of lengths ({min(p.lengths)})"),
    adds_full=True, cli=add_cli, interleave=True)
