"""Helpers every `python -m analysis <command>` shares: flags, method specs, errors, output.

    p = add_task_parser(subparsers, "needle", "needle-in-a-haystack grid")   # common flags
    params = build_params(NeedleParams, args, lengths=args.lengths)          # validated
    run, seconds = run_job(args, run_needle, params, "needle")               # load, run
    return print_run(run, needle_markdown(run))                              # print

Method specs (`--methods`): comma-separated `name[:key=value[:key=value]]`, e.g.
`full,snapkv,faedkv:variant=resample,faedkv:variant=iwdft:key_space=pre_rope`. Values are
parsed as true/false/null, integers, floats, else strings; `plan=@plans/x.json` reads a
FrequencyPlan JSON file; `ratio=0.5` gives that method its own compression ratio instead of
`--ratios`. Every other method is run at every ratio of `--ratios`; `full` once. `faedkv-default`
is FAEDKVPress()'s configuration: `faedkv` with analysis.api.params.FAEDKV_DEFAULT's params
(later pairs override them), stored as that expansion.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from analysis.api.params import PRESETS, QUERY_MODES, MethodSpec

DEFAULT_OUT = "results"


class ArgParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump): `error: <what> (see <prog> --help)`."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def one_line(exc: BaseException) -> str:
    """An exception as one line; pydantic validation errors as `field: message; ...`."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            parts = [f"{'.'.join(str(x) for x in e.get('loc', ())) or 'value'}: {e.get('msg')}"
                     for e in errors()]
            return "invalid parameters: " + "; ".join(parts)
        except Exception:  # noqa: BLE001 - fall back to the plain message
            pass
    return " ".join(str(exc).split())


def _list(text: str, cast, what: str) -> list:
    try:
        values = [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}")
    if not values:
        raise argparse.ArgumentTypeError(f"empty list {text!r}; give comma-separated {what}")
    return values


def int_list(text: str) -> list[int]:
    return _list(text, int, "integers")


def float_list(text: str) -> list[float]:
    return _list(text, float, "numbers")


def parse_value(text: str):
    """A method parameter value: true/false/null, int, float, @file.json, else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none"):
        return None
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read JSON from {path} ({exc.__class__.__name__}: {exc})") from exc
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_methods(text: str, ratios: list[float]) -> list[MethodSpec]:
    """`--methods` x `--ratios` -> MethodSpecs (see the module docstring)."""
    specs: list[MethodSpec] = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        name, *pairs = item.split(":")
        params, own_ratio = {}, None
        if name in PRESETS:      # faedkv-default: the registry's faedkv with FAEDKVPress()'s params
            name, preset = PRESETS[name]
            params = dict(preset)
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise ValueError(f"method {item!r}: {pair!r} is not key=value (e.g. "
                                 "faedkv:variant=resample)")
            if key in ("ratio", "compression_ratio"):
                own_ratio = float(value)
            else:
                params[key] = parse_value(value)
        if name == "full":
            specs.append(MethodSpec(name="full", params=params))
            continue
        for ratio in ([own_ratio] if own_ratio is not None else ratios):
            specs.append(MethodSpec(name=name, compression_ratio=ratio, params=params))
    if not specs:
        raise ValueError("no methods given; e.g. --methods full,snapkv,faedkv:variant=iwdft")
    unique = []
    for s in specs:
        if s not in unique:
            unique.append(s)
    return unique


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="embedded SmolLM2 (default), a .gguf file, tiny-random-llama, tiny-random-qwen2, random-llama3-8b, a folder or a HF id")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16), float32, bfloat16, float16")


def add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT}/)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: this process; ray: one Ray task per cell (one GPU each on GPUs)")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (default: start a local Ray instance)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_method_args(p: argparse.ArgumentParser, ratios: str = "0.5,0.75") -> None:
    p.add_argument("--methods", default="full,streaming_llm,snapkv,faedkv-default",
                   help="comma-separated name[:key=value...] (full is always included); faedkv-default is "
                        "FAEDKVPress()'s configuration (faedkv with the search winner's params, which key=value "
                        "pairs after it override); bare faedkv is the iwdft base every knob starts from")
    p.add_argument("--ratios", type=float_list, default=float_list(ratios),
                   help=f"compression ratios, fraction of the cache removed (default {ratios})")


def add_grid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--query-mode", choices=QUERY_MODES, default="query_agnostic",
                   help="query_agnostic: question after compression (kvpress default); "
                        "query_aware: question inside the compressed prompt")
    p.add_argument("--samples", type=int, default=5, help="samples per cell (default 5)")
    p.add_argument("--first-sample", type=int, default=0,
                   help="index of the first sample (default 0): --samples 2 --first-sample 3 adds samples 3 "
                        "and 4 to a grid that ran 3, the same samples a 5-sample run draws")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length (default 32)")


def add_task_parser(subparsers, name: str, help_text: str, grid: bool = True
                    ) -> argparse.ArgumentParser:
    """A subcommand parser with the flags every task shares (model, methods, output, seed;
    with grid: query mode, samples, answer length)."""
    p = subparsers.add_parser(name, help=help_text, description=help_text)
    add_model_args(p)
    add_method_args(p)
    if grid:
        add_grid_args(p)
    p.add_argument("--seed", type=int, default=0, help="base seed of the samples (default 0)")
    add_output_args(p)
    return p


def build_params(cls, args, **fields):
    """The task's params model from the shared flags plus `fields` (validation errors are
    ValueErrors: pydantic's ValidationError is one)."""
    methods = parse_methods(args.methods, args.ratios)
    common = {"methods": methods, "seed": args.seed}
    for flag, field in (("query_mode", "query_mode"), ("samples", "samples"),
                        ("first_sample", "first_sample"), ("max_new_tokens", "max_new_tokens")):
        if hasattr(args, flag) and field in cls.model_fields:
            common[field] = getattr(args, flag)
    return cls(**common, **fields)


def open_model_and_store(args):
    """(ModelHandle, ResultsStore) from the shared flags. The model is loaded now, so a model
    that cannot load fails (ModelLoadError, a ValueError) before anything is drawn or written."""
    from analysis.results.runner import ModelHandle
    from analysis.results.store import ResultsStore

    handle = ModelHandle(args.model, args.device, args.dtype)
    handle.get()
    return handle, ResultsStore(args.out)


def progress_bar(args, desc: str, unit: str = "cell"):
    """(progress(done, total), close()): a tqdm bar on stderr, or nothing with --no-progress."""
    if getattr(args, "no_progress", False):
        return lambda done, total: None, lambda: None
    from tqdm.auto import tqdm

    bar = tqdm(total=1, desc=desc, unit=unit, dynamic_ncols=True)

    def progress(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()

    return progress, bar.close


def run_job(args, run_fn, params, desc: str, unit: str = "cell"):
    """Run (or resume) a job kind's run function from the shared flags into the --out store,
    with a progress bar: (run, wall seconds). Every command that runs a job goes through here."""
    handle, store = open_model_and_store(args)
    start = time.perf_counter()
    progress, close = progress_bar(args, desc, unit)
    try:
        key = run_fn(handle, store, params, progress=progress, executor=args.executor,
                     ray_address=args.ray_address)
    finally:
        close()
    return store.get(key), time.perf_counter() - start


def print_run(run, text: str) -> int:
    """A task command's output: its table, then where the run is stored."""
    print()
    print(text)
    print(f"\nrun {run.name} in {run.path}")
    return 0


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code
