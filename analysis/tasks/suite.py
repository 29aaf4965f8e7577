"""A RULER-style long-context suite generated from seeds over the essays: one score per task.

    key = run_suite(loaded, store, SuiteParams(methods=[...], context_length=2048, samples=5))
    print(suite_markdown(store.get(key)))

Every sample is `make_suite_sample(tokenizer, task, context_length, seed)`: deterministic in
the seed (stable_seed(params.seed, "suite", task, context_length, sample)), the same for every
method. `context_length` is the document's token count; the answer keys are inside it.

Tasks (RULER's templates where RULER has one; the haystack is essay text from a seeded sentence
start, needles are inserted on sentence boundaries at seeded depths):
- multikey_niah: 4 needles "One of the special magic numbers for <word> is: <7 digits>." with
  different words; the question asks for one word's number. Score: 1 if it is in the answer.
- multivalue_niah: 4 needles with the same word and different numbers; the question asks for
  all of them. Score: fraction recalled.
- variable_tracking: a chain "VAR AAAAA = 12345." then "VAR BBBBB = VAR AAAAA." ... (5 names,
  4 hops) at increasing depths; the question asks for every variable holding the value.
  Score: fraction of the 5 names recalled.
- common_words: a numbered list of words drawn from the essays' vocabulary, 10 of them
  repeated f times (f = 2..30, sized to the context) and the rest once, shuffled; the question
  asks for the 10 most common. Score: fraction of the 10 recalled.
- essay_qa: one essay (chosen by the seed; the next one if it has no usable sentence: a few
  are a paragraph long) from its start, continuing into the next essays if it is shorter
  than the context. A sentence of that essay with 12-40 words whose first six
  words occur once in the context is chosen; the question quotes those six words and asks to
  complete the sentence; the answer prefix is the six words. Score: ROUGE-L F1 between the
  rest of the sentence and the prediction cut at its first sentence end (the model may keep
  going after the sentence; that is not held against it). Verifiable from the essay alone.

Metrics: per (method, task) the mean score with a 95% interval, and per method the average
over tasks and that average relative to full's on the same samples.
"""
from __future__ import annotations

import dataclasses
import random
import re
import string

from analysis.api.params import SUITE_TASKS, MethodSpec, SuiteParams
from analysis.harness import haystack
from analysis.tasks import JobKind, run_grid, stable_seed, unique_labels, with_full
from analysis.tasks.scoring import mean_interval, recall, rouge_l

NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
NUM_NEEDLES = 4
NUM_HOPS = 4
NUM_COMMON = 10
LEAD_WORDS = 6


@dataclasses.dataclass(frozen=True)
class SuiteSample:
    task: str
    context: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    metric: str                 # "recall" (fraction of answers found) or "rouge_l"
    context_tokens: int
    seed: int

    @property
    def expected(self) -> str:
        return ", ".join(self.answers)


def _line(text: str) -> str:
    return f"\n{text}\n"


def _niah(tokenizer, n: int, rng: random.Random, needles: list[str]) -> tuple[str, int]:
    depths = sorted(rng.uniform(0, 100) for _ in needles)
    base = haystack.haystack_tokens(tokenizer, n, offset_seed=rng.randrange(2 ** 31))
    ids, _ = haystack.insert_needles(tokenizer, base, [_line(x) for x in needles], depths)
    return tokenizer.decode(ids), len(ids)


def multikey_niah(tokenizer, n: int, rng: random.Random) -> dict:
    keys = rng.sample(haystack.essay_words(), NUM_NEEDLES)
    values = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
    target = rng.randrange(NUM_NEEDLES)
    context, tokens = _niah(tokenizer, n, rng, [NIAH_NEEDLE.format(key=k, value=v)
                                                for k, v in zip(keys, values)])
    key = keys[target]
    return dict(context=context, context_tokens=tokens, answers=(values[target],), metric="recall",
                question=f"What is the special magic number for {key} mentioned in the provided text?",
                answer_prefix=f"The special magic number for {key} mentioned in the provided text is")


def multivalue_niah(tokenizer, n: int, rng: random.Random) -> dict:
    key = rng.choice(haystack.essay_words())
    values = []
    while len(values) < NUM_NEEDLES:
        v = str(rng.randint(1_000_000, 9_999_999))
        if v not in values:
            values.append(v)
    context, tokens = _niah(tokenizer, n, rng, [NIAH_NEEDLE.format(key=key, value=v) for v in values])
    return dict(context=context, context_tokens=tokens, answers=tuple(values), metric="recall",
                question=f"What are all the special magic numbers for {key} mentioned in the "
                         "provided text?",
                answer_prefix=f"The special magic numbers for {key} mentioned in the provided "
                              "text are")


def variable_tracking(tokenizer, n: int, rng: random.Random) -> dict:
    names: list[str] = []
    while len(names) < NUM_HOPS + 1:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}."
                                              for i in range(1, len(names))]
    context, tokens = _niah(tokenizer, n, rng, chain)
    return dict(context=context, context_tokens=tokens, answers=tuple(names), metric="recall",
                question=f"Find all variables that are assigned the value {value} in the text "
                         "above.",
                answer_prefix=f"According to the chain(s) of variable assignment in the text "
                              f"above, {len(names)} variables are assigned the value {value}, "
                              "they are:")


CWE_HEADER = ("Below is a numbered list of words. In these words, some appear more often than "
              "others. Memorize the ones that appear most often.\n")


def common_words(tokenizer, n: int, rng: random.Random) -> dict:
    pool = rng.sample(haystack.essay_words(), min(len(haystack.essay_words()), 4000))
    common, rare = pool[:NUM_COMMON], pool[NUM_COMMON:]
    # About 4 tokens per numbered entry; common words take at most half of the list.
    freq = max(2, min(30, n // (4 * 2 * NUM_COMMON)))
    order = rng.random()

    def text(k: int) -> str:
        words = [w for w in common for _ in range(freq)] + rare[:k]
        random.Random(order).shuffle(words)
        return CWE_HEADER + " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))

    lo, hi = 0, len(rare)
    if len(haystack.encode(tokenizer, text(0))) > n:
        raise ValueError(f"common_words needs more than {n} tokens for {NUM_COMMON} words x "
                         f"{freq}; use a longer context_length")
    while lo < hi:                    # the most rare words that still fit in n tokens
        mid = (lo + hi + 1) // 2
        if len(haystack.encode(tokenizer, text(mid))) <= n:
            lo = mid
        else:
            hi = mid - 1
    context = text(lo)
    return dict(context=context, context_tokens=len(haystack.encode(tokenizer, context)),
                answers=tuple(common), metric="recall",
                question=f"What are the {NUM_COMMON} most common words in the above list?",
                answer_prefix=f"The top {NUM_COMMON} words that appear most often in the list are:")


_SENTENCE = re.compile(r"[^.!?]+[.!?]")


def _sentences(tokenizer, n: int, index: int) -> tuple[str, list[list[str]]]:
    """(context from essay `index`, the essay's usable sentences as word lists): 12-40 words,
    complete, inside the essay's own part of the context, first words unique in the context."""
    essay = haystack.essays()[index][1]
    ids = haystack.text_tokens(tokenizer, n, index)
    context = tokenizer.decode(ids)
    own = context[:min(len(context), len(essay))]
    flat_context = " ".join(context.split())
    usable = []
    for match in list(_SENTENCE.finditer(own))[:-1]:   # the last one may be cut off
        words = match.group().split()
        if 12 <= len(words) <= 40 and flat_context.count(" ".join(words[:LEAD_WORDS])) == 1:
            usable.append(words)
    return context, usable


def essay_qa(tokenizer, n: int, rng: random.Random) -> dict:
    count = len(haystack.essays())
    first = rng.randrange(count)
    # A few essays are a paragraph long: take the next essay that has a usable sentence.
    for index in [(first + k) % count for k in range(count)]:
        context, usable = _sentences(tokenizer, n, index)
        if usable:
            break
    else:
        raise ValueError(f"no essay has a usable sentence within {n} tokens; use a longer "
                         "context_length")
    words = rng.choice(usable)
    lead, rest = " ".join(words[:LEAD_WORDS]), " ".join(words[LEAD_WORDS:])
    return dict(context=context, context_tokens=n, answers=(rest,), metric="rouge_l",
                question=f'In the essay above, one sentence begins with "{lead}". Complete that '
                         "sentence exactly as it is written in the essay.",
                answer_prefix=lead)


GENERATORS = {
    "multikey_niah": multikey_niah,
    "multivalue_niah": multivalue_niah,
    "variable_tracking": variable_tracking,
    "common_words": common_words,
    "essay_qa": essay_qa,
}
assert tuple(GENERATORS) == SUITE_TASKS


def make_suite_sample(tokenizer, task: str, context_length: int, seed: int) -> SuiteSample:
    """The sample of `task` for `seed` (deterministic)."""
    if task not in GENERATORS:
        raise ValueError(f"unknown suite task {task!r}; known: {', '.join(GENERATORS)}")
    fields = GENERATORS[task](tokenizer, context_length, random.Random(seed))
    return SuiteSample(task=task, seed=seed, **fields)


def first_sentence(text: str) -> str:
    match = re.search(r"[.!?](\s|$)", text)
    return text[:match.end()].strip() if match else text.strip()


def score_suite(sample: SuiteSample, prediction: str) -> float:
    """The task's score of a prediction in [0, 1]."""
    if sample.metric == "rouge_l":
        return rouge_l(first_sentence(prediction), sample.answers[0])
    return recall(prediction, list(sample.answers))


def sample_seed(params: SuiteParams, task: str, sample: int) -> int:
    return stable_seed(params.seed, "suite", task, params.context_length, sample)


def suite_cells(params: SuiteParams) -> list[dict]:
    labels = unique_labels(params.methods)
    cells = []
    for task in params.tasks:
        for s in params.sample_indices():
            seed = sample_seed(params, task, s)
            for spec, label in zip(params.methods, labels):
                cells.append({"id": f"{label}|task={task}|sample={s}",
                              "method": spec.model_dump(mode="json"), "label": label,
                              "task": task, "sample": s, "seed": seed})
    return cells


@dataclasses.dataclass
class SuiteCell:
    handle: object
    params: SuiteParams

    def __call__(self, cell: dict) -> dict:
        from analysis.harness.generation import answer_details
        from analysis.harness.methods import build_press

        loaded = self.handle.get()
        p = self.params
        spec = MethodSpec(**cell["method"])
        sample = make_suite_sample(loaded.tokenizer, cell["task"], p.context_length, cell["seed"])
        press = build_press(spec, loaded.model)
        a = answer_details(loaded, press, sample.context, sample.question, p.max_new_tokens,
                           p.query_mode, sample.answer_prefix)
        return {"method": spec.name, "label": cell["label"], "ratio": spec.compression_ratio,
                "task": cell["task"], "sample": cell["sample"], "seed": cell["seed"],
                "query_mode": p.query_mode, "prediction": a.text, "expected": sample.expected,
                "score": score_suite(sample, a.text), "metric": sample.metric,
                "prompt_tokens": a.prompt_tokens, "context_tokens": sample.context_tokens,
                "cache_lengths": a.cache_lengths,
                "expected_cache_lengths": a.expected_cache_lengths, "seconds": a.seconds}


def run_suite(model, store, params: SuiteParams, progress=None, should_stop=None,
              executor: str = "local", ray_address: str | None = None,
              show_progress: bool = True) -> str:
    """Run (or resume) the suite (methods x tasks x samples, full always included)."""
    params = params.model_copy(update={"methods": with_full(params.methods)})
    return run_grid("suite", model, store, params, suite_cells(params),
                    lambda handle: SuiteCell(handle, params),
                    lambda rows, name: suite_metrics(rows, params, name),
                    progress=progress, should_stop=should_stop, executor=executor,
                    ray_address=ray_address, show_progress=show_progress)


def suite_metrics(rows: list[dict], params: SuiteParams, model_name: str = "") -> dict:
    labels = unique_labels(params.methods)
    by_task, by_method = [], []
    for label, spec in zip(labels, params.methods):
        means = {}
        for task in params.tasks:
            scores = [r["score"] for r in rows if r["label"] == label and r["task"] == task]
            if not scores:
                continue
            mean, lo, hi = mean_interval(scores)
            means[task] = mean
            by_task.append({"label": label, "ratio": spec.compression_ratio, "task": task,
                            "n": len(scores), "score": mean, "ci_low": lo, "ci_high": hi})
        average = sum(means.values()) / len(means) if means else None
        by_method.append({"label": label, "ratio": spec.compression_ratio, "average": average,
                          **{f"score_{t}": v for t, v in means.items()}})
    full = next((m["average"] for m in by_method if m["label"] == "full"), None)
    for m in by_method:
        m["rel_to_full"] = (m["average"] / full) if full and m["average"] is not None else None
    return {"task": "suite", "query_mode": params.query_mode, "model": model_name,
            "context_length": params.context_length, "tasks": list(params.tasks),
            "cells": len(rows), "average_full": full, "by_method": by_method, "by_task": by_task}


def suite_table(run):
    import pandas as pd

    metrics = run.metrics() if hasattr(run, "metrics") else run
    if not metrics or metrics.get("task") != "suite":
        raise ValueError("this run has no suite metrics (unfinished, or another task)")
    return pd.DataFrame(metrics["by_method"])


def suite_markdown(run) -> str:
    metrics = run.metrics() if hasattr(run, "metrics") else run
    tasks = metrics["tasks"]
    head = ["method"] + tasks + ["average", "rel. to full"]
    lines = [f"Suite ({metrics['context_length']} tokens, {metrics['query_mode']}, "
             f"{metrics.get('model', '')}): mean score per task", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(x):
        return "-" if x is None or x != x else f"{x:.2f}"     # x != x: NaN (a missing task)

    for m in suite_table(metrics).to_dict("records"):
        row = [m["label"]] + [fmt(m.get(f"score_{t}")) for t in tasks]
        rel = m.get("rel_to_full")
        row += [fmt(m["average"]), "-" if rel is None or rel != rel else f"{100 * rel:.0f}%"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def add_cli(subparsers) -> None:
    """`python -m analysis suite ...`"""
    from analysis import cli

    p = cli.add_task_parser(subparsers, "suite", "RULER-style suite over the essays")
    p.add_argument("--tasks", default=",".join(SUITE_TASKS),
                   help=f"comma-separated tasks (default all: {','.join(SUITE_TASKS)})")
    p.add_argument("--context-length", type=int, default=2048,
                   help="document length in tokens (default 2048)")
    p.set_defaults(func=_cli_main)


def _cli_main(args) -> int:
    from analysis import cli

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    params = cli.build_params(SuiteParams, args, tasks=tasks, context_length=args.context_length)
    run, _ = cli.run_job(args, run_suite, params, "suite")
    return cli.print_run(run, suite_markdown(run))


KIND = JobKind(
    name="suite", params=SuiteParams, run="analysis.tasks.suite:run_suite",
    context=lambda p, tokenizer: (
        p.context_length + p.max_new_tokens,
        f"context_length ({p.context_length}) + max_new_tokens ({p.max_new_tokens})"),
    shortest=lambda p, tokenizer: (p.context_length, f"context_length ({p.context_length})"),
    adds_full=True, cli=add_cli, interleave=True)
