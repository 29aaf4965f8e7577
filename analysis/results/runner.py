"""Grids of cells, run locally or as Ray tasks, written to a results-store run as they finish.

    handle = ModelHandle("smollm2-135m-instruct")            # pickles as its load arguments
    compute = NeedleCell(handle, params)                      # a picklable callable: cell -> record
    records = run_cells(run, cells, compute, executor="ray")  # resumes, writes each cell at once

Both executors share the semantics: cells already in the run are skipped (resume), each new
record is written with `run.put` by this process as soon as it arrives (one writer per run),
`progress(done, total)` counts resumed cells too (a damaged cell file is moved aside and its
cell computed again), `should_stop()` is polled between cells and
turns into `Cancelled` (run status "cancelled"), and a cell whose compute raises marks the run
"failed" with the message and re-raises (the finished cells stay, a rerun resumes).
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from analysis.results.store import Run

EXECUTORS = ("local", "ray")
_PROJECT = Path(__file__).resolve().parents[2]
# How long the Ray driver waits for a result before polling should_stop() again (seconds).
_POLL_SECONDS = 0.5


class Cancelled(Exception):
    """The grid was stopped by should_stop() (or Ctrl-C); finished cells are kept."""


# ------------------------------------------------------------------------------ model handle

_MODELS: dict[tuple, Any] = {}
_MODELS_LOCK = threading.Lock()


class ModelHandle:
    """A model by its load arguments: cheap to pickle (Ray ships it to every worker), loaded
    lazily on first `.get()`, once per process (a process-wide cache keyed by the arguments)."""

    def __init__(self, model: str | None = None, device: str = "auto", dtype: str = "auto",
                 attn_implementation: str | None = None):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.attn_implementation = attn_implementation
        self._loaded = None

    @property
    def args(self) -> tuple:
        return (self.model, self.device, self.dtype, self.attn_implementation)

    def __repr__(self) -> str:
        return (f"ModelHandle(model={self.model!r}, device={self.device!r}, dtype={self.dtype!r}, "
                f"attn_implementation={self.attn_implementation!r})")

    def __eq__(self, other) -> bool:
        return isinstance(other, ModelHandle) and other.args == self.args

    def __hash__(self) -> int:
        return hash(self.args)

    def __getstate__(self) -> dict:
        # Only the arguments travel; the receiving process loads (or reuses) its own copy.
        return {"model": self.model, "device": self.device, "dtype": self.dtype,
                "attn_implementation": self.attn_implementation}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._loaded = None

    @classmethod
    def from_loaded(cls, loaded) -> "ModelHandle":
        """A handle on a model this process already holds (`analysis.harness.models.LoadedModel`):
        `.get()` returns it without reloading; a pickled copy reloads it by its info."""
        info = loaded.info
        # A Ray GPU worker sees its one GPU as "cuda", whatever index the driver used.
        device = "cuda" if str(info.device).startswith("cuda") else str(info.device)
        handle = cls(info.name, device=device, dtype=info.dtype,
                     attn_implementation=info.attn_implementation)
        handle._loaded = loaded
        with _MODELS_LOCK:
            _MODELS.setdefault(handle.args, loaded)
        return handle

    def get(self):
        """The loaded model (`LoadedModel`), loading it in this process on first use."""
        if self._loaded is None:
            with _MODELS_LOCK:
                loaded = _MODELS.get(self.args)
                if loaded is None:
                    from analysis.harness.models import load_model

                    loaded = load_model(*self.args)
                    _MODELS[self.args] = loaded
            self._loaded = loaded
        return self._loaded

    @staticmethod
    def clear_cache() -> None:
        """Forget every model this process cached (handles that hold one keep theirs)."""
        with _MODELS_LOCK:
            _MODELS.clear()


# ------------------------------------------------------------------------------------ grids


def _check_cells(cells: list[dict]) -> None:
    seen: set[str] = set()
    for i, cell in enumerate(cells):
        if not isinstance(cell, dict) or not isinstance(cell.get("id"), str) or not cell["id"]:
            raise ValueError(f"cell {i} ({cell!r:.80}) needs a non-empty string 'id'")
        if cell["id"] in seen:
            raise ValueError(f"cell id {cell['id']!r} occurs twice in the grid; ids must be unique")
        seen.add(cell["id"])


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _error_text(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)  # Ray wraps the worker's exception
    exc = cause if isinstance(cause, BaseException) else exc
    return f"{exc.__class__.__name__}: {exc}"


class _Tracker:
    """Writes records as they arrive and reports progress."""

    def __init__(self, run: Run, total: int, done: int, progress, desc: str, show: bool):
        self.run, self.total, self.done, self.progress = run, total, done, progress
        self.records: dict[str, dict] = {}
        self.bar = tqdm(total=total, initial=done, desc=desc, unit="cell", disable=not show,
                        dynamic_ncols=True)

    def report(self) -> None:
        if self.progress is not None:
            self.progress(self.done, self.total)

    def finish(self, cell_id: str, record: dict) -> None:
        self.records[cell_id] = self.run.put(cell_id, record)
        self.done += 1
        self.bar.update(1)
        self.report()


def run_cells(run: Run, cells: list[dict], compute: Callable[[dict], dict], *,
              executor: str = "local", progress: Callable[[int, int], None] | None = None,
              should_stop: Callable[[], bool] | None = None, ray_address: str | None = None,
              desc: str = "cells", show_progress: bool = True) -> dict[str, dict]:
    """Compute every cell of `cells` not yet in `run`; returns cell id -> record for all of
    `cells` (resumed and new, in grid order).

    cells: dicts with a unique string "id" (and whatever `compute` needs).
    compute: cell -> JSON-able dict; for executor="ray" it must pickle (hold a ModelHandle,
        not a model).
    executor: "local" (this process, in order) or "ray" (one task per cell, one GPU each when
        this process sees CUDA; joins `ray_address`, or starts a local instance).
    """
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}")
    _check_cells(cells)
    run.set_total(len(cells))
    done = run.done(repair=True)       # damaged cells are moved aside and computed again
    pending = [cell for cell in cells if cell["id"] not in done]
    tracker = _Tracker(run, len(cells), len(cells) - len(pending), progress, desc, show_progress)
    tracker.records.update({c["id"]: done[c["id"]] for c in cells if c["id"] in done})
    tracker.report()
    try:
        if pending:
            run.set_status("running")
            if executor == "local":
                _run_local(pending, compute, tracker, should_stop)
            else:
                _run_ray(pending, compute, tracker, should_stop, ray_address)
    except (Cancelled, KeyboardInterrupt):
        run.set_status("cancelled", "stopped after "
                       f"{tracker.done} of {tracker.total} cells")
        raise
    except BaseException as exc:
        run.set_status("failed", _error_text(exc))
        raise
    finally:
        tracker.bar.close()
    return {cell["id"]: tracker.records[cell["id"]] for cell in cells}


def _run_local(pending, compute, tracker: _Tracker, should_stop) -> None:
    for cell in pending:
        if should_stop is not None and should_stop():
            raise Cancelled(f"stopped after {tracker.done} of {tracker.total} cells")
        tracker.finish(cell["id"], compute(cell))


def _call(compute, cell):
    """The Ray task body (module level, so workers import it by name)."""
    return compute(cell)


def _driver_paths() -> list[str]:
    """The project root and this process's own import folders (not the interpreter's): what a
    worker needs to import `analysis`, `faedkv` and the module that defines `compute`."""
    system = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    paths = [str(_PROJECT)]
    for entry in sys.path:
        path = Path(entry or os.getcwd()).resolve()
        if path.is_dir() and not any(path == s or s in path.parents for s in system):
            paths.append(str(path))
    return list(dict.fromkeys(paths))


def ray_init(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start Ray the way run_cells needs it, unless it is already running.

    address=None starts a local instance (num_cpus defaults to this machine's cores) whose
    workers import from the driver's folders (PYTHONPATH). An address ("auto", "ray://host:10001",
    "host:6379") joins a cluster and ships the `analysis` and `faedkv` packages to it; the nodes
    need the same Python packages (requirements.txt) installed.
    """
    import ray

    if ray.is_initialized():
        return
    if address is None:
        existing = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(_driver_paths() + existing))}
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                 runtime_env={"env_vars": env})
    else:
        modules = [str(_PROJECT / "analysis"), str(_PROJECT / "faedkv")]
        ray.init(address=address, include_dashboard=False,
                 runtime_env={"py_modules": [m for m in modules if os.path.isdir(m)]})


def _run_ray(pending, compute, tracker: _Tracker, should_stop, address: str | None) -> None:
    import ray

    ray_init(address)
    gpus = _cuda_available()
    task = ray.remote(num_gpus=1, num_cpus=1)(_call) if gpus else ray.remote(num_cpus=1)(_call)
    resources = ray.cluster_resources()
    slots = int(resources.get("GPU" if gpus else "CPU", 1)) or 1
    # Submit a bounded window so a stop request cancels little work and memory stays flat.
    window = max(2 * slots, 2)
    compute_ref = ray.put(compute)
    queue = list(reversed(pending))
    in_flight: dict[Any, str] = {}
    try:
        while queue or in_flight:
            if should_stop is not None and should_stop():
                raise Cancelled(f"stopped after {tracker.done} of {tracker.total} cells")
            while queue and len(in_flight) < window:
                cell = queue.pop()
                in_flight[task.remote(compute_ref, cell)] = cell["id"]
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=_POLL_SECONDS)
            # Collect everything that is ready now; a failing cell raises here.
            if ready:
                ready, _ = ray.wait(list(in_flight), num_returns=len(in_flight), timeout=0)
            for ref in ready:
                cell_id = in_flight.pop(ref)
                tracker.finish(cell_id, ray.get(ref))
    finally:
        for ref in in_flight:
            ray.cancel(ref)
