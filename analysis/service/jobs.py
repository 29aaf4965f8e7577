"""The backend's job queue: one worker thread owns the model and runs one job at a time.

    queue = JobQueue(loaded, store_root)        # reloads <store>/jobs/*.json
    queue.start()
    job = queue.submit("needle", NeedleParams(...))
    queue.wait(job["id"])                       # {"status": "done", "run_key": ..., ...}

Order: a priority queue where interactive jobs (`generate`) go before batch jobs (then first
in, first out). A batch job is a grid of cells; between two of its cells (in its progress
callback, on the worker thread, when the model carries no press: kinds declared `interleave`)
the worker also runs the interactive jobs queued meanwhile, so an answer never waits for a
30-minute ablation.

Persistence: every job is a JSON file `<store>/jobs/<id>.json`, written atomically on every
change of state (progress at most once a second). A restarted server lists them all and marks
the ones that were queued or running as "interrupted" (the store marks their runs interrupted
too); a job file that does not parse is skipped and reported (`skipped`, /health). A job that
fails marks its run "failed" with the message. Resubmitting the same parameters resumes:
the results store keys runs by content, so the job opens the same run and skips its finished
cells.

The kinds are `analysis.tasks.kinds()`; each names its run function "module:function", imported
lazily: a kind whose module is not installed is reported as unavailable (`JobUnavailable`), the
others keep working.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import heapq
import importlib
import itertools
import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from analysis.api.job_states import JOB_STATUSES, TERMINAL
from analysis.api.params import Strict
from analysis.results.store import ResultsStore, StoreError, atomic_write_text, json_safe
from analysis.tasks import JobKind, kinds

log = logging.getLogger(__name__)

# Finished job files kept on disk; older ones are removed when the server starts.
MAX_KEPT_JOBS = 1000
_PROGRESS_PERSIST_SECONDS = 1.0
INTERRUPTED = ("the server stopped (restart or crash) before this job finished; submit the same "
               "job again to resume from its finished cells")


# Queued jobs one server accepts at most (then 429): a client loop cannot fill the disk.
MAX_QUEUED = 256


class QueueFull(RuntimeError):
    """The queue already holds max_queued jobs."""


class JobUnavailable(LookupError):
    """The job kind's module is not installed in this backend (yet)."""


class UnknownJob(KeyError):
    """No job with this id."""

    def __str__(self) -> str:
        return self.args[0] if self.args else "unknown job"


def job_kind(kind: str) -> JobKind:
    """The declaration of `kind`; ValueError naming the known kinds."""
    found = kinds().get(kind)
    if found is None:
        raise ValueError(f"unknown job kind {kind!r}; known: {', '.join(kinds())}")
    return found


def job_function(kind: str) -> Callable:
    """The function that runs `kind`, imported now (a module that lands later lights up)."""
    module_name, _, name = job_kind(kind).run.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - a broken or missing module disables one kind only
        if not (isinstance(exc, ModuleNotFoundError) and exc.name == module_name):
            log.warning("job kind %s unavailable: %s fails to import", kind, module_name,
                        exc_info=exc)
        raise JobUnavailable(
            f"job kind {kind!r} is not available in this backend: {module_name} cannot be "
            f"imported ({exc.__class__.__name__}: {exc}); install or update the analysis "
            "package on the server.") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise JobUnavailable(f"job kind {kind!r} is not available in this backend: {module_name} "
                             f"has no function {name}(); update the analysis package on the server.")
    return fn


def availability() -> dict[str, str | None]:
    """kind -> None when it can run, else why not."""
    out: dict[str, str | None] = {}
    for kind in kinds():
        try:
            job_function(kind)
            out[kind] = None
        except JobUnavailable as exc:
            out[kind] = str(exc)
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def error_message(exc: BaseException) -> str:
    """What a user reads: the exception's message (its class name when it has none)."""
    text = str(exc).strip()
    return text if text else exc.__class__.__name__


@dataclasses.dataclass
class Job:
    id: str
    kind: str
    params: dict
    status: str = "queued"
    progress: dict = dataclasses.field(default_factory=lambda: {"done": 0, "total": 0})
    run_key: str | None = None
    result: dict | None = None
    error: str | None = None
    created: str = dataclasses.field(default_factory=_now)
    started: str | None = None
    finished: str | None = None

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "progress": dict(self.progress)}

    @classmethod
    def from_dict(cls, data: Any) -> "Job":
        """A job from its file's JSON; ValueError naming what is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        job = cls(**{k: v for k, v in data.items() if k in names})
        if not isinstance(job.id, str) or job.kind not in kinds() or job.status not in JOB_STATUSES:
            raise ValueError("not a job record (id, kind, status)")
        if not isinstance(job.params, dict) or not isinstance(job.progress, dict):
            raise ValueError("params and progress must be objects")
        if not isinstance(job.created, str) or not (job.run_key is None or isinstance(job.run_key, str)):
            raise ValueError("created must be a string, run_key a string or null")
        return job


class _JobStore(ResultsStore):
    """The store a job writes to: tells the queue which run the job opened, so a running or
    cancelled job already names its run (partial results are readable at once)."""

    on_open: Callable[[str], None] | None = None

    def open_run(self, kind: str, config: dict):
        run = super().open_run(kind, config)
        if self.on_open is not None:
            self.on_open(run.key)
        return run


class JobQueue:
    """Jobs of one backend. Thread-safe; `start()` launches the single worker thread."""

    def __init__(self, model, store_root: str | Path, executor: str = "local",
                 ray_address: str | None = None, read_only: bool = False,
                 max_queued: int = MAX_QUEUED):
        self.model = model                      # LoadedModel (or runner.ModelHandle)
        # read_only: another server writes this store; jobs live in memory only (generate).
        self.read_only = read_only
        self.max_queued = max_queued
        self.store = _JobStore(store_root, read_only=read_only)
        self.jobs_dir = Path(store_root) / "jobs"
        self.skipped: list[str] = []            # job files that did not parse (file: why)
        if not read_only:
            self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.executor = executor
        self.ray_address = ray_address
        self._jobs: dict[str, Job] = {}
        self._heap: list[tuple[int, int, str]] = []
        self._seq = itertools.count()
        self._cancel: set[str] = set()
        self._input_errors: set[str] = set()     # jobs that failed on their parameters
        self._running: str | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._persisted_at: dict[str, float] = {}
        self._reload()

    # -- persistence ----------------------------------------------------------------------

    def _path(self, job_id: str) -> Path:
        return self.jobs_dir / f"{job_id}.json"

    def _persist(self, job: Job) -> None:
        if self.read_only:
            return
        self.store._writable()         # this process holds the store's writer lock
        atomic_write_text(self._path(job.id), json.dumps(json_safe(job.to_dict()), indent=1))
        self._persisted_at[job.id] = time.monotonic()

    def _reload(self) -> None:
        """Read the job files a previous server left; what was unfinished is interrupted."""
        jobs = []
        for path in sorted(self.jobs_dir.glob("*.json")):
            if path.name.startswith("."):
                continue
            try:
                job = Job.from_dict(json.loads(path.read_text(encoding="utf-8")))
                if job.id != path.stem:
                    raise ValueError(f"it holds job {job.id!r}")
            except (OSError, ValueError, TypeError) as exc:
                self.skipped.append(f"jobs/{path.name}: {exc.__class__.__name__}: {exc}")
                log.warning("skipping unreadable job file %s (%s); delete it", path, exc)
                continue
            if job.status not in TERMINAL and not self.read_only:
                job.status, job.error, job.finished = "interrupted", INTERRUPTED, _now()
                self._persist(job)
            jobs.append(job)
        jobs.sort(key=lambda j: j.created)
        self._jobs = {job.id: job for job in jobs}
        self._prune()

    def _prune(self) -> None:
        """Forget the oldest finished jobs beyond MAX_KEPT_JOBS (memory and disk)."""
        excess = len(self._jobs) - MAX_KEPT_JOBS
        if excess <= 0:
            return
        finished = sorted((j for j in self._jobs.values() if j.status in TERMINAL),
                          key=lambda j: j.created)
        for job in finished[:excess]:
            del self._jobs[job.id]
            self._persisted_at.pop(job.id, None)
            self._input_errors.discard(job.id)
            if not self.read_only:
                with contextlib.suppress(OSError):
                    self._path(job.id).unlink()

    # -- public API ------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="faedkv-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the worker after its current job (asks that job to stop); jobs still queued
        become "interrupted" (their waiters wake up)."""
        with self._cond:
            self._stopping = True
            if self._running is not None:
                self._cancel.add(self._running)
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            for job in list(self._jobs.values()):
                if job.status == "queued":
                    self._finish(job, "interrupted", error=INTERRUPTED)

    def submit(self, kind: str, params: Strict) -> dict:
        """Queue a job (params already validated); returns its record."""
        declared = job_kind(kind)
        if not isinstance(params, declared.params):
            raise ValueError(f"{kind!r} jobs take {declared.params.__name__} parameters")
        job_function(kind)      # fail now, not in the worker, when the kind cannot run
        if self.read_only and not declared.interactive:
            raise StoreError("this server opened its store read-only (another server writes "
                             "it): it answers generate requests but runs no batch job; submit "
                             "it to the server that writes the store.")
        job = Job(id=uuid.uuid4().hex, kind=kind, params=params.model_dump(mode="json"))
        with self._cond:
            queued = sum(1 for j in self._jobs.values() if j.status == "queued")
            if queued >= self.max_queued:
                raise QueueFull(f"the queue already holds {queued} jobs (this server's limit); "
                                "wait for some to finish or cancel some (POST /jobs/{id}/cancel).")
            self._jobs[job.id] = job
            self._prune()
            self._persist(job)
            heapq.heappush(self._heap, (0 if declared.interactive else 1, next(self._seq), job.id))
            self._cond.notify_all()
            return job.to_dict()

    def get(self, job_id: str) -> dict:
        with self._cond:
            return self._job(job_id).to_dict()

    def list(self) -> list[dict]:
        """Every job, newest first."""
        with self._cond:
            jobs = sorted(self._jobs.values(), key=lambda j: j.created, reverse=True)
            return [j.to_dict() for j in jobs]

    def cancel(self, job_id: str) -> dict:
        """A queued job is cancelled at once; a running one stops before its next cell (its
        finished cells stay in the store). Cancelling a finished job changes nothing."""
        with self._cond:
            job = self._job(job_id)
            if job.status == "queued":
                self._finish(job, "cancelled", error="cancelled before it started")
            elif job.status == "running":
                self._cancel.add(job.id)
            return job.to_dict()

    def wait(self, job_id: str, timeout: float | None = None) -> dict:
        """Block until the job is finished (or `timeout` seconds pass); returns its record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            job = self._job(job_id)
            while job.status not in TERMINAL:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
            return job.to_dict()

    def summary(self) -> dict:
        with self._cond:
            queued = sum(1 for j in self._jobs.values() if j.status == "queued")
            return {"queued": queued, "running": self._running}

    def input_error(self, job_id: str) -> bool:
        """Did the job fail because of its parameters (a ValueError), not the server?"""
        with self._cond:
            return job_id in self._input_errors

    def active_run_keys(self) -> set[str]:
        """Runs that a queued or running job writes to (they must not be deleted now)."""
        with self._cond:
            return {j.run_key for j in self._jobs.values()
                    if j.run_key and j.status not in TERMINAL}

    # -- worker ----------------------------------------------------------------------------

    def _job(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise UnknownJob(f"no job {job_id!r}; list the jobs with GET /jobs")
        return job

    def _finish(self, job: Job, status: str, result: dict | None = None,
                error: str | None = None) -> None:
        """(holding the lock)"""
        job.status, job.finished = status, _now()
        if result is not None:
            job.result = result
        job.error = error
        self._cancel.discard(job.id)
        self._persist(job)
        self._cond.notify_all()

    def _next(self, interactive_only: bool = False) -> Job | None:
        """Pop the next queued job (holding the lock); None when there is none."""
        while self._heap:
            priority, _, job_id = self._heap[0]
            if interactive_only and priority != 0:
                return None
            heapq.heappop(self._heap)
            job = self._jobs.get(job_id)
            if job is not None and job.status == "queued":
                return job
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                job = None if self._stopping else self._next()
                while job is None and not self._stopping:
                    self._cond.wait()
                    job = self._next()
                if job is None or self._stopping:
                    if job is not None:
                        heapq.heappush(self._heap, (0, -1, job.id))   # stop() interrupts it
                    return
                self._running = job.id
            try:
                self._execute(job)
            finally:
                with self._cond:
                    self._running = None
                    self._cond.notify_all()

    def _execute(self, job: Job) -> None:
        from analysis.results.runner import Cancelled

        with self._cond:
            job.status, job.started = "running", _now()
            self._persist(job)
            self._cond.notify_all()
        status, result, error = "failed", None, "the worker stopped during this job"
        try:
            declared = job_kind(job.kind)
            params = declared.params.model_validate(job.params)
            fn = job_function(job.kind)
            if declared.interactive:
                result = json_safe(fn(self._loaded(), params))
            else:
                key = self._run_batch(job, fn, params)
                if key is not None:
                    with self._cond:
                        job.run_key = str(key)
            status, error = "done", None
        except (Cancelled, KeyboardInterrupt) as exc:
            status, error = "cancelled", error_message(exc)
            if self._stopping:          # the server is shutting down, nobody cancelled it
                status, error = "interrupted", f"{INTERRUPTED} ({error})"
        except Exception as exc:  # noqa: BLE001 - a job's failure must not kill the worker
            log.error("job %s (%s) failed", job.id, job.kind, exc_info=exc)
            if isinstance(exc, ValueError) and not isinstance(exc, StoreError):
                self._input_errors.add(job.id)
            status, error = "failed", error_message(exc)
            self._fail_run(job, error)
        finally:
            self.store.on_open = None
            with self._cond:
                self._finish(job, status, result=result, error=error)

    def _fail_run(self, job: Job, error: str) -> None:
        """The job's run says why it stopped (run_cells does so for a failing cell; this covers
        failures before or after the cells), unless it finished."""
        if job.run_key is None:
            return
        try:
            run = self.store.get(job.run_key)
            if run.status in ("running", "interrupted"):
                run.set_status("failed", error)
        except (StoreError, OSError) as exc:
            log.warning("job %s: could not mark run %s failed: %s", job.id, job.run_key, exc)

    def _loaded(self):
        get = getattr(self.model, "get", None)
        return get() if callable(get) else self.model

    def _run_batch(self, job: Job, fn: Callable, params: Strict) -> Any:
        interleave = job_kind(job.kind).interleave

        def opened(key: str) -> None:
            with self._cond:
                if job.run_key is None:
                    job.run_key = key
                    self._persist(job)
                    self._cond.notify_all()

        def progress(done: int, total: int) -> None:
            with self._cond:
                job.progress = {"done": int(done), "total": int(total)}
                if time.monotonic() - self._persisted_at.get(job.id, 0.0) >= _PROGRESS_PERSIST_SECONDS:
                    self._persist(job)
                self._cond.notify_all()
            if interleave:
                # Between two cells the model is free: answer interactive requests now.
                self._run_interactive()

        def should_stop() -> bool:
            with self._cond:
                return job.id in self._cancel

        # A run function draws no progress bar when it is given a progress callback.
        self.store.on_open = opened
        return fn(self.model, self.store, params, progress=progress, should_stop=should_stop,
                  executor=self.executor, ray_address=self.ray_address)

    def _run_interactive(self) -> None:
        """Run the queued interactive jobs (called on the worker thread between cells)."""
        while True:
            with self._cond:
                job = self._next(interactive_only=True)
            if job is None:
                return
            # The batch job's store hook must not see the interactive job's runs.
            hook, self.store.on_open = self.store.on_open, None
            try:
                self._execute(job)
            finally:
                self.store.on_open = hook
