"""The job kinds, one declaration each, and the evaluation tasks over the essay haystack.

    kinds()["needle"]                             # JobKind: params model, run function, CLI, ...
    run_needle(model, store, NeedleParams(...))   # analysis.tasks.needle
    run_suite(model, store, SuiteParams(...))     # analysis.tasks.suite (RULER-style)
    run_ppl(model, store, PplParams(...))         # analysis.tasks.ppl (continuation NLL)

A job kind is declared once, as `KIND = JobKind(...)` in its own module of this package
(generate, needle, suite, ppl, spectra, ablate, contrib); the server (`analysis.service.server`), the
job queue (`analysis.service.jobs`) and the CLI (`python -m analysis`) loop over `kinds()`, so adding
a kind is adding one module here. Declarations are torch-free (the server's request side
imports them): the run function is named "module:function" and imported when a job runs. The
computations of spectra, ablate and contrib import torch at the top, so they live in `spectral/`
(a package without a KIND, which `kinds()` imports and passes over).

Shared rules, here so every task follows them:
- `model` is a `LoadedModel` or a `runner.ModelHandle`; cells run through `runner.run_cells`
  (local or Ray), each written to the store as it finishes, so a killed grid resumes.
- Every grid includes the full cache (`with_full`), so each table can show accuracy relative
  to `full` on the same samples.
- Samples are seeded by `stable_seed(params.seed, <cell coordinates without the method>)`:
  every method sees the same samples.
- The run config is the model identity (`info.key`), the task parameters (`key_dict()`, after
  `with_full`) and `project_commit()`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import pkgutil
from typing import Any, Callable

from analysis.api.params import MethodSpec, Strict

FULL = MethodSpec(name="full")


def _own_cells(params: Strict, num_layers: int) -> int:
    return params.num_cells()


def _listed_methods(params: Strict) -> list[tuple[str, MethodSpec]]:
    return [(f"params.methods.{i}", m) for i, m in enumerate(getattr(params, "methods", []))]


@dataclasses.dataclass(frozen=True)
class JobKind:
    """Everything the server, the job queue and the CLI know about one job kind.

    How a job expands into cells, how a cell runs and what its metrics are stay behind `run`
    (in the module it names); the rest is what the backend checks before it queues a job."""
    name: str
    params: type[Strict]            # the request body's model; the run is keyed on its key_dict()
    # "module:function". Batch kinds: run(model, store, params, progress=None, should_stop=None,
    # executor="local", ray_address=None) -> run key; interactive: run(loaded, params) -> dict.
    run: str
    # (params, tokenizer) -> (tokens the job puts in the model's context at once, what they are)
    context: Callable[[Any, Any], tuple[int, str]]
    # (params, tokenizer) -> (the fewest context tokens a compressed prefill of the job sees,
    # what they are); None for kinds that run no compression method
    shortest: Callable[[Any, Any], tuple[int, str]] | None = None
    # (params, with the full cache added when adds_full; the model's layers) -> cells computed
    cells: Callable[[Any, int], int] = _own_cells
    # params -> (field path, spec) of every method the job runs
    methods: Callable[[Any], list[tuple[str, MethodSpec]]] = _listed_methods
    adds_full: bool = False         # the run adds the full cache to its methods (with_full)
    # (params, ModelInfo) -> None; a ValueError names what else the loaded model rules out
    check: Callable[[Any, Any], None] | None = None
    # add_cli(subparsers): the kind's `python -m analysis` command(s); None: no command
    cli: Callable[[Any], None] | None = None
    interactive: bool = False       # a waiting request: runs ahead of batch jobs, returns a dict
    # progress() comes only from runner.run_cells between two cells, when the model carries no
    # press or hook: the queue may run waiting interactive jobs inside it
    interleave: bool = False

    def full_params(self, params: Strict) -> Strict:
        """`params` with the methods the run really computes (full first where it adds it)."""
        if not self.adds_full:
            return params
        return params.model_copy(update={"methods": with_full(params.methods)})

    def num_cells(self, params: Strict, num_layers: int) -> int:
        return self.cells(self.full_params(params), num_layers)


@functools.cache
def kinds() -> dict[str, JobKind]:
    """Every job kind by name: the `KIND` of each module of this package (module-name order)."""
    found: dict[str, JobKind] = {}
    for module in pkgutil.iter_modules(__path__):
        kind = getattr(importlib.import_module(f"{__name__}.{module.name}"), "KIND", None)
        if kind is None:
            continue
        if kind.name in found:
            raise RuntimeError(f"job kind {kind.name!r} is declared twice (analysis.tasks."
                               f"{module.name} and another module); rename one")
        found[kind.name] = kind
    return found


def stable_seed(*parts) -> int:
    """A seed from JSON-able parts, the same in every process and Python version (unlike
    hash()), in [0, 2**31)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF


def with_full(methods: list[MethodSpec]) -> list[MethodSpec]:
    """`methods` with "full" first (added when absent, kept once)."""
    rest = [m for m in methods if m.name != "full"]
    return [FULL] + rest


def unique_labels(methods: list[MethodSpec]) -> list[str]:
    """Each method's label; two specs with the same label are an error (they would share rows)."""
    from analysis.harness.methods import method_label

    labels = [method_label(m) for m in methods]
    seen = set()
    for label in labels:
        if label in seen:
            raise ValueError(f"method {label!r} is listed twice; give each method once")
        seen.add(label)
    return labels


def model_handle(model):
    """(ModelHandle, LoadedModel) for a LoadedModel or a ModelHandle."""
    from analysis.results.runner import ModelHandle

    if isinstance(model, ModelHandle):
        return model, model.get()
    return ModelHandle.from_loaded(model), model


def run_config(loaded, params) -> dict:
    from analysis.results.store import project_commit

    return {"model": loaded.info.key, "params": params.key_dict(),
            "project_commit": project_commit()}


def run_grid(kind: str, model, store, params, cells: list[dict], make_cell, metrics,
             desc: str | None = None, progress=None, should_stop=None, executor: str = "local",
             ray_address: str | None = None, show_progress: bool = True) -> str:
    """The body every task shares: open (or resume) the run keyed on model + params, run the
    cells, write predictions.csv and metrics.json; returns the run key.

    make_cell(handle) -> the picklable per-cell callable; metrics(rows, model_name) -> dict.
    `params` must already include full (`with_full`). The progress bar is drawn only when
    `show_progress` and no `progress` callback is given (a caller with one draws its own)."""
    from analysis.results.runner import run_cells

    handle, loaded = model_handle(model)
    run = store.open_run(kind, run_config(loaded, params))
    records = run_cells(run, cells, make_cell(handle), executor=executor, progress=progress,
                        should_stop=should_stop, ray_address=ray_address, desc=desc or kind,
                        show_progress=show_progress and progress is None)
    rows = [{"cell_id": c["id"], **records[c["id"]]} for c in cells]
    run.write_predictions(rows)
    run.write_metrics(metrics(rows, loaded.info.name))
    return run.key
