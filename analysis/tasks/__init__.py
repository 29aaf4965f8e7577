"""Evaluation tasks over the essay haystack, each a grid of cells in the results store.

    run_needle(model, store, NeedleParams(...))   # analysis.tasks.needle
    run_suite(model, store, SuiteParams(...))     # analysis.tasks.suite (RULER-style)
    run_ppl(model, store, PplParams(...))         # analysis.tasks.ppl (continuation NLL)

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

import hashlib
import json

from analysis.params import MethodSpec

FULL = MethodSpec(name="full")


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
    from analysis.methods import method_label

    labels = [method_label(m) for m in methods]
    seen = set()
    for label in labels:
        if label in seen:
            raise ValueError(f"method {label!r} is listed twice; give each method once")
        seen.add(label)
    return labels


def model_handle(model):
    """(ModelHandle, LoadedModel) for a LoadedModel or a ModelHandle."""
    from analysis.runner import ModelHandle

    if isinstance(model, ModelHandle):
        return model, model.get()
    return ModelHandle.from_loaded(model), model


def run_config(loaded, params) -> dict:
    from analysis.store import project_commit

    return {"model": loaded.info.key, "params": params.key_dict(),
            "project_commit": project_commit()}


def run_grid(kind: str, model, store, params, cells: list[dict], make_cell, metrics,
             desc: str | None = None, progress=None, should_stop=None, executor: str = "local",
             ray_address: str | None = None, show_progress: bool = True) -> str:
    """The body every task shares: open (or resume) the run keyed on model + params, run the
    cells, write predictions.csv and metrics.json; returns the run key.

    make_cell(handle) -> the picklable per-cell callable; metrics(rows, model_name) -> dict.
    `params` must already include full (`with_full`)."""
    from analysis.runner import run_cells

    handle, loaded = model_handle(model)
    run = store.open_run(kind, run_config(loaded, params))
    records = run_cells(run, cells, make_cell(handle), executor=executor, progress=progress,
                        should_stop=should_stop, ray_address=ray_address, desc=desc or kind,
                        show_progress=show_progress)
    rows = [{"cell_id": c["id"], **records[c["id"]]} for c in cells]
    run.write_predictions(rows)
    run.write_metrics(metrics(rows, loaded.info.name))
    return run.key
