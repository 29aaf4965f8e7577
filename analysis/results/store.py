"""The results store: one folder per run, one file per finished grid cell, and a SQLite index.

    store = ResultsStore("results/")
    run = store.open_run("needle", {"model": info.key, "task": params.key_dict(),
                                    "project_commit": project_commit()})
    run.put("len=1024.depth=50.method=snapkv@0.75.sample=0", {"correct": True})
    run.write_metrics({"accuracy": 0.8})

Layout (what kvpress users know, plus the cells):

    results/
      index.sqlite                  # derivable from the folders: `python -m analysis store reindex`
      runs/<kind>-<key>/
        config.yaml                 # {kind, key, created, config}; key == run_key(kind, config)
        status.json                 # {status, error, cells_total, updated}
        cells/<cell_id>.json        # {cell_id, record, written}; one per finished cell
        arrays/<name>.npz           # spectra, matrices
        predictions.csv
        metrics.json

Content addressing: a run's key is a hash of its kind and config, so the config must hold every
input the results depend on (model name + revision, dtype, attention implementation, method +
parameters, task + parameters, seed, and `project_commit()`). Same config, same folder: a killed
grid resumes where it stopped.

Crash safety: every file is written to a temporary file in the same folder (`.<name>.<host>-<pid>-
<rand>.tmp`), fsynced and renamed over the target, so a reader sees the old file or the new one,
never half of one. A crash can only leave a `*.tmp` file behind; readers ignore those and opening
a run removes the ones whose writer is gone. A cell file that does not parse (which atomic writes
never produce: something else damaged it) is an error naming the file, not a silently missing
cell: delete the file and the cell is recomputed by the next run.

One writer per store: the first write of a process takes an exclusive lock on `<root>/.lock`
(flock) and holds it until the process exits (or `release()`); the server takes it at start.
A second process that tries to write gets `StoreLocked` naming the holder; readers (`store list`,
a `read_only=True` store, a read-only server) never need it. Taking the lock marks the runs a
dead writer left "running" as "interrupted". Threads of the writing process share the lock:
each index access opens its own short-lived SQLite connection (WAL journal, 30 s busy timeout),
read-modify-write updates of a run's status file happen inside an IMMEDIATE transaction of the
index. The index lives on a local disk (SQLite's WAL and flock do not work over NFS).

Integrity: every cell file carries the sha256 of its record; a cell that does not parse or
whose checksum does not match is damaged. `verify()` lists damaged and missing cells and
unreadable metrics; `verify(repair=True)` (and every resumed grid) moves damaged cells aside
(`cells/<name>.json.damaged`) so exactly those are computed again, and a resumed grid rebuilds
metrics.json from the cells. A damaged index.sqlite is moved aside and rebuilt at open.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as _dt
import fcntl
import functools
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import yaml

log = logging.getLogger(__name__)

# "interrupted": its writer died (set when the next writer takes the store's lock);
# "incomplete": marked complete, but cells are missing or damaged (verify --repair, reindex).
STATUSES = ("running", "complete", "failed", "cancelled", "interrupted", "incomplete")
INTERRUPTED_RUN = ("the process writing this run stopped (crash or kill) before it finished; "
                   "run the same job or command again to resume from its finished cells")
INCOMPLETE_RUN = ("cells are missing or damaged; run the same job or command again to compute "
                  "exactly those (see `python -m analysis store verify`)")
INDEX_VERSION = 1
KEY_LENGTH = 16
_KIND = re.compile(r"[A-Za-z0-9_]+")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_=-][A-Za-z0-9_.=-]{0,119}")
_RUN_FOLDER = re.compile(r"(?P<kind>[A-Za-z0-9_]+)-(?P<key>[0-9a-f]{16})")
_TMP = re.compile(r"\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")
# A temporary file lives for milliseconds; one this old is from a crash on some machine.
_STALE_TMP_SECONDS = 3600.0
_REPO = Path(__file__).resolve().parents[2]


class StoreError(ValueError):
    """A store file is corrupt, foreign or missing; the message names the file and the fix."""


class StoreLocked(StoreError):
    """Another process writes this store (one writer per store)."""


class StoreReadOnly(StoreError):
    """The store was opened read-only."""


# ------------------------------------------------------------------------ the writer's lock

_LOCKS: dict[str, int] = {}          # lock file (resolved) -> open fd holding the flock
_LOCKS_GUARD = threading.Lock()


def _lock_path(root: Path) -> Path:
    return root / ".lock"


def lock_holder(root: str | os.PathLike) -> dict | None:
    """What the lock file says about the process holding the lock ({pid, host, command,
    since}); None when nobody holds it."""
    path = _lock_path(Path(root))
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if str(path.resolve()) not in _LOCKS:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return None                 # free: the text is a dead writer's
            except BlockingIOError:
                pass
        try:
            info = json.loads(text)
        except ValueError:
            info = {}
        return info if isinstance(info, dict) else {}
    finally:
        os.close(fd)


def _describe_holder(info: dict | None) -> str:
    if not info:
        return "another process"
    return (f"process {info.get('pid', '?')} ({info.get('command', '?')}) since "
            f"{str(info.get('since', '?'))[:19].replace('T', ' ')} UTC")


def locked_message(root: str | os.PathLike, holder: dict | None) -> str:
    return (f"the results store {root} is being written by {_describe_holder(holder)}: one "
            "writer per store. Stop that process, use another --out/--store folder, or read "
            "this one without writing (`python -m analysis store list`, `python -m "
            "analysis.service.server --read-only`).")


def acquire_lock(root: str | os.PathLike) -> bool:
    """Take the store's writer lock for this process (held until exit or `release_lock`);
    True when this call took it, False when this process already held it. StoreLocked when
    another process holds it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = _lock_path(root)
    key = str(path.resolve())
    with _LOCKS_GUARD:
        if key in _LOCKS:
            return False
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLocked(locked_message(root, lock_holder(root))) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now(),
                "command": " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])[:200]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        _LOCKS[key] = fd
        return True


def release_lock(root: str | os.PathLike) -> None:
    """Give the writer lock back (a no-op when this process does not hold it)."""
    key = str(_lock_path(Path(root)).resolve())
    with _LOCKS_GUARD:
        fd = _LOCKS.pop(key, None)
    if fd is not None:
        os.close(fd)       # closing the only descriptor releases the flock


def holds_lock(root: str | os.PathLike) -> bool:
    return str(_lock_path(Path(root)).resolve()) in _LOCKS


# ---------------------------------------------------------------------------------- identity


@functools.lru_cache(maxsize=None)
def _commit_of(folder: str) -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "") if head else "unknown"


def project_commit(path: str | os.PathLike | None = None) -> str:
    """The git commit of the project (of `path` if given), "+dirty" when tracked files are
    modified, "unknown" outside a git checkout. Cached per process: the commit a run started
    with is the one it is keyed on."""
    return _commit_of(str(Path(path).resolve() if path is not None else _REPO))


def json_safe(obj: Any, where: str = "value") -> Any:
    """`obj` as plain JSON types: NaN and infinities become None (JSON has neither), numpy
    scalars and arrays become numbers and lists, tuples lists, paths strings."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, np.bool_):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: key {k!r} is a {type(k).__name__}; JSON keys must be "
                                 "strings (convert it with str()).")
            out[k] = json_safe(v, f"{where}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist(), where)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise ValueError(f"{where} is a {type(obj).__name__}, which cannot be stored as JSON; convert "
                     "it to numbers, strings, lists or dicts first.")


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, no NaN: the same value always gives the same text."""
    return json.dumps(json_safe(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def record_checksum(record: dict) -> str:
    """sha256 of the record's canonical JSON: what a cell file's "sha256" must be."""
    return hashlib.sha256(canonical_json(record).encode("utf-8")).hexdigest()


def run_key(kind: str, config: dict) -> str:
    """First 16 hex digits of the sha256 of the canonical JSON of {"kind", "config"}."""
    text = canonical_json({"kind": kind, "config": config})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:KEY_LENGTH]


def safe_name(name: str) -> str:
    """A file name for a cell id or array name: the id itself when it only uses
    [A-Za-z0-9_.=-] (no leading dot, at most 120 characters), else "~" + a hash of it
    ("~" cannot occur in a kept id, so the two never collide)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a cell id / array name must be a non-empty string, got {name!r}")
    if _SAFE_NAME.fullmatch(name):
        return name
    return "~" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:32]


def _now() -> str:
    return _iso(time.time())


def _iso(timestamp: float) -> str:
    """UTC ISO-8601 with microseconds: sorts as text in time order."""
    return _dt.datetime.fromtimestamp(timestamp, _dt.timezone.utc).isoformat(timespec="microseconds")


# ---------------------------------------------------------------------------- atomic files

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: Path, write) -> None:
    """Call `write(fileobj)` on a temporary file beside `path`, fsync it, rename it over `path`."""
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _dump_json(obj: Any, indent: int | None = None) -> str:
    return json.dumps(json_safe(obj), indent=indent, ensure_ascii=False, allow_nan=False) + "\n"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _is_stale_tmp(path: Path) -> bool:
    match = _TMP.search(path.name)
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return False
    if match and match["host"] == _HOST and int(match["pid"]) != os.getpid():
        return not _pid_alive(int(match["pid"])) or age > _STALE_TMP_SECONDS
    return age > _STALE_TMP_SECONDS


def clean_tmp(folder: Path) -> int:
    """Remove the temporary files a crashed writer left in `folder`; returns how many."""
    removed = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            path = Path(entry.path)
            if entry.name.endswith(".tmp") and entry.name.startswith(".") and _is_stale_tmp(path):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        path.unlink()
                removed += 1
    return removed


def _why(exc: BaseException) -> str:
    """An exception as one line (YAML parser errors span several)."""
    return f"{exc.__class__.__name__}: " + " ".join(str(exc).split())[:200]


def _fix_hint(run_dir: Path) -> str:
    return (f"delete the run ({run_dir}, or `python -m analysis store delete {run_dir.name} "
            f"--out {run_dir.parent.parent}`) and run it again")


def _read_json(path: Path, run_dir: Path, hint: str | None = None) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path} is corrupt ({_why(exc)}); "
                         f"{hint or _fix_hint(run_dir)}.") from exc


# ------------------------------------------------------------------------------------- run


class Run:
    """One run folder. Cheap to construct; every read goes to the files, so several processes
    can share a run (the grid runner's driver is its single writer)."""

    def __init__(self, store: "ResultsStore", path: Path, kind: str, key: str, config: dict,
                 created: str):
        self.store = store
        self.path = path
        self.kind = kind
        self.key = key
        self.config = config
        self.created = created

    def __repr__(self) -> str:
        return f"Run({self.name!r}, status={self.status!r})"

    @property
    def name(self) -> str:
        """The folder name, "<kind>-<key>"."""
        return self.path.name

    # -- status ---------------------------------------------------------------------------

    def _status_file(self) -> dict:
        path = self.path / "status.json"
        try:
            data = _read_json(path, self.path)
        except FileNotFoundError:
            # A folder without status (hand-assembled or shipped): its metrics say it finished.
            done = (self.path / "metrics.json").exists()
            return {"status": "complete" if done else "running", "error": None,
                    "cells_total": None, "updated": self.created}
        if not isinstance(data, dict) or data.get("status") not in STATUSES:
            raise StoreError(f"{path} is not a run status file ({data!r:.80}); "
                             f"{_fix_hint(self.path)}.")
        return data

    @property
    def status(self) -> str:
        return self._status_file()["status"]

    @property
    def error(self) -> str | None:
        return self._status_file().get("error")

    @property
    def cells_total(self) -> int | None:
        return self._status_file().get("cells_total")

    def _update_status(self, **changes) -> None:
        self.store._writable()
        with self.store._transaction() as conn:
            data = self._status_file()
            data.update(changes, updated=_now())
            atomic_write_text(self.path / "status.json", _dump_json(data, indent=2))
            self.store._upsert(conn, self)

    def set_status(self, status: str, error: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown run status {status!r}; use one of {', '.join(STATUSES)}")
        self._update_status(status=status, error=error)

    def set_total(self, n: int) -> None:
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"cells_total must be a non-negative int, got {n!r}")
        self._update_status(cells_total=n)

    # -- cells ----------------------------------------------------------------------------

    def _cell_path(self, cell_id: str) -> Path:
        return self.path / "cells" / (safe_name(cell_id) + ".json")

    def put(self, cell_id: str, record: dict) -> dict:
        """Write one finished cell atomically; returns the record as stored (NaN -> None)."""
        if not isinstance(record, dict):
            raise ValueError(f"cell {cell_id!r}: a record must be a dict, got {type(record).__name__}")
        self.store._writable()
        record = json_safe(record, f"cell {cell_id!r}")
        target = self._cell_path(cell_id)
        text = _dump_json({"cell_id": cell_id, "record": record, "written": _now(),
                           "sha256": record_checksum(record)})
        tmp = _tmp_path(target)
        try:
            with open(tmp, "wb") as f:
                f.write(text.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            # The rename happens under the index's write lock, so "was it new?" and the
            # cells_done counter agree across processes.
            with self.store._transaction() as conn:
                new = not target.exists()
                os.replace(tmp, target)
                # "updated" is the newest file's mtime, so reindex derives the same value.
                updated = max(_iso(target.stat().st_mtime), self._status_file().get("updated") or "")
                cur = conn.execute("UPDATE runs SET cells_done = cells_done + ?, updated = ? "
                                   "WHERE key = ?", (int(new), updated, self.key))
                if cur.rowcount == 0:
                    self.store._upsert(conn, self)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(target.parent)
        return record

    def _cell_files(self) -> Iterator[Path]:
        """Finished cell files; temporary files (a writer mid-rename, or a crash) are skipped."""
        folder = self.path / "cells"
        if not folder.is_dir():
            return
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.endswith(".json") and not entry.name.startswith("."):
                    yield Path(entry.path)

    def _read_cell(self, path: Path) -> tuple[str, dict]:
        hint = (f"delete {path.name} to recompute that cell on the next run, or "
                f"{_fix_hint(self.path)}")
        data = _read_json(path, self.path, hint)
        if (not isinstance(data, dict) or not isinstance(data.get("cell_id"), str)
                or not isinstance(data.get("record"), dict)):
            raise StoreError(f"{path} is not a cell record (expected cell_id and record); {hint}.")
        if safe_name(data["cell_id"]) + ".json" != path.name:
            raise StoreError(f"{path} holds cell {data['cell_id']!r}, which belongs in another "
                             f"file; {hint}.")
        # Cells written before checksums existed (shipped assets) have none: accepted as read.
        if "sha256" in data and data["sha256"] != record_checksum(data["record"]):
            raise StoreError(f"{path} does not match its checksum (edited or damaged); {hint}.")
        return data["cell_id"], data["record"]

    def inspect(self) -> tuple[dict[str, dict], list[tuple[Path, str]]]:
        """(cell_id -> record of every intact cell, [(file, problem)] of the damaged ones)."""
        good, bad = {}, []
        for path in sorted(self._cell_files()):
            try:
                cell_id, record = self._read_cell(path)
            except StoreError as exc:
                bad.append((path, str(exc)))
                continue
            good[cell_id] = record
        return good, bad

    def done(self, repair: bool = False) -> dict[str, dict]:
        """cell_id -> record of every finished cell (and re-syncs the index's count). A damaged
        cell is a StoreError naming it; with `repair=True` it is moved aside instead
        (`<name>.json.damaged`), so the grid computes exactly that cell again."""
        out, bad = self.inspect()
        if bad and not repair:
            raise StoreError(bad[0][1])
        for path, reason in bad:
            self.quarantine(path, reason)
        self.store._sync_count(self, len(out))
        return out

    def quarantine(self, path: Path, reason: str) -> Path:
        """Move a damaged file aside (kept for inspection, ignored by readers)."""
        self.store._writable()
        target = path.with_name(path.name + ".damaged")
        os.replace(path, target)
        log.warning("moved damaged %s aside to %s: %s", path.name, target.name, reason)
        return target

    def records(self) -> list[dict]:
        """Every finished cell's record with its "cell_id", sorted by cell id."""
        return [{**rec, "cell_id": cid} for cid, rec in sorted(self.done().items())]

    # -- arrays, predictions, metrics -----------------------------------------------------

    def _array_path(self, name: str) -> Path:
        return self.path / "arrays" / (safe_name(name) + ".npz")

    def put_array(self, name: str, **arrays) -> None:
        if not arrays:
            raise ValueError(f"put_array({name!r}) needs at least one array, e.g. put_array(name, x=...)")
        self.store._writable()
        values = {k: np.asarray(v) for k, v in arrays.items()}
        for k, v in values.items():
            if v.dtype == object:
                raise ValueError(f"array {name!r}/{k} has dtype object; store numeric arrays only")
        atomic_write(self._array_path(name), lambda f: np.savez(f, **values))

    def get_array(self, name: str) -> dict[str, np.ndarray]:
        path = self._array_path(name)
        if not path.exists():
            raise StoreError(f"{path} does not exist: run {self.name} has no array {name!r} "
                             f"(has: {', '.join(self.array_names()) or 'none'}).")
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            raise StoreError(f"{path} is corrupt ({_why(exc)}); "
                             f"{_fix_hint(self.path)}.") from exc

    def array_names(self) -> list[str]:
        folder = self.path / "arrays"
        return sorted(p.stem for p in folder.glob("*.npz") if not p.name.startswith("."))

    def write_predictions(self, rows: list[dict]) -> None:
        """predictions.csv, one row per generation; columns in first-seen order, nested values
        as JSON text, NaN as an empty field."""
        self.store._writable()
        columns: dict[str, None] = {}
        for row in rows:
            columns.update(dict.fromkeys(row))

        def cell(value):
            value = json_safe(value)
            if isinstance(value, (dict, list)):
                return json.dumps(value, ensure_ascii=False, sort_keys=True)
            return "" if value is None else value

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: cell(v) for k, v in row.items()})
        atomic_write_text(self.path / "predictions.csv", buf.getvalue())

    def read_predictions(self) -> list[dict]:
        """predictions.csv as a list of dicts of strings ([] when not written)."""
        path = self.path / "predictions.csv"
        try:
            with open(path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise StoreError(f"{path} is corrupt ({_why(exc)}); {_fix_hint(self.path)}.") from exc

    def write_metrics(self, metrics: dict, status: str = "complete") -> None:
        if not isinstance(metrics, dict):
            raise ValueError(f"metrics must be a dict, got {type(metrics).__name__}")
        if status not in STATUSES:
            raise ValueError(f"unknown run status {status!r}; use one of {', '.join(STATUSES)}")
        self.store._writable()
        atomic_write_text(self.path / "metrics.json",
                          _dump_json(json_safe(metrics, "metrics"), indent=2))
        self._update_status(status=status, error=None)

    def metrics(self) -> dict | None:
        hint = ("the metrics are derived from the cells: run the same job or command again to "
                "rebuild metrics.json (the cells are kept)")
        try:
            data = _read_json(self.path / "metrics.json", self.path, hint)
        except FileNotFoundError:
            return None
        if not isinstance(data, dict):
            raise StoreError(f"{self.path / 'metrics.json'} is not a JSON object; {hint}.")
        return data

    def problems(self) -> list["Problem"]:
        """Everything wrong with this run's files: damaged cells, cells missing from a run
        marked complete, unreadable metrics."""
        out = []
        good, bad = self.inspect()
        out += [Problem(self.name, "damaged cell", path.name, reason) for path, reason in bad]
        state = self._status_file()
        total = state.get("cells_total")
        if state["status"] in ("complete", "incomplete") and total is not None and len(good) < total:
            out.append(Problem(self.name, "missing cells", "cells/",
                               f"{total - len(good)} of {total} cells are missing or damaged"))
        try:
            self.metrics()
        except StoreError as exc:
            out.append(Problem(self.name, "damaged metrics", "metrics.json", str(exc)))
        return out

    def repair(self, problems: list["Problem"]) -> None:
        """Move damaged cells and metrics aside and mark the run incomplete, so running the
        same job again computes exactly the missing cells and rebuilds the metrics."""
        for problem in problems:
            if problem.what in ("damaged cell", "damaged metrics"):
                folder = self.path / "cells" if problem.what == "damaged cell" else self.path
                path = folder / problem.file
                if path.exists():
                    self.quarantine(path, problem.reason)
        if problems and self.status in ("complete", "running"):
            self.set_status("incomplete", INCOMPLETE_RUN)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing `ResultsStore.verify()` found wrong."""
    run: str          # folder name
    what: str         # "damaged cell" | "missing cells" | "damaged metrics" | "broken run"
    file: str
    reason: str


# ----------------------------------------------------------------------------------- store

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    cells_done INTEGER NOT NULL DEFAULT 0,
    cells_total INTEGER,
    config TEXT NOT NULL,
    metrics TEXT
);
CREATE INDEX IF NOT EXISTS runs_kind_created ON runs (kind, created);
CREATE INDEX IF NOT EXISTS runs_created ON runs (created);
"""


class ResultsStore:
    """Run folders under `root/runs/` and their index `root/index.sqlite`.

    `read_only=True`: every write raises StoreReadOnly (for reading a store another process
    writes). `repairs` lists what opening the store fixed (a damaged index rebuilt)."""

    def __init__(self, root: str | os.PathLike, read_only: bool = False):
        self.root = Path(root)
        self.read_only = read_only
        self.runs_dir = self.root / "runs"
        self.index_path = self.root / "index.sqlite"
        self.repairs: list[str] = []
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        fresh = not self.index_path.exists()
        try:
            fresh = self._open_index() or fresh
        except StoreError as exc:
            if read_only:         # the writer rebuilds it; a reader must not move files
                raise
            self.repair_index(exc)
            fresh = False
        clean_tmp(self.runs_dir)
        if fresh and any(self._run_folders()):
            self._rebuild_index()

    def repair_index(self, exc: Exception) -> None:
        """The index is derivable: keep the damaged file for inspection, build a new one from
        the run folders (at open, or when a read finds it damaged)."""
        aside = self._move_index_aside()
        self.repairs.append(f"{self.index_path.name} was damaged ({exc.__cause__ or exc}); moved "
                            f"it to {aside.name} and rebuilt the index from the run folders")
        log.warning("%s", self.repairs[-1])
        self._open_index()
        self._rebuild_index()

    def _open_index(self) -> bool:
        """Create or check the index; True when it had to be (re)created."""
        fresh = False
        with self._connect() as conn:
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version != INDEX_VERSION:
                    # An older or unknown layout is simply rebuilt.
                    conn.execute("DROP TABLE IF EXISTS runs")
                    fresh = True
                conn.executescript(_SCHEMA)
                conn.execute(f"PRAGMA user_version = {INDEX_VERSION}")
                conn.execute("SELECT count(*) FROM runs").fetchone()
            except sqlite3.DatabaseError as exc:
                raise self._index_error(exc) from exc
        return fresh

    def _move_index_aside(self) -> Path:
        aside = self.index_path.with_name(f"{self.index_path.name}.damaged-{int(time.time())}")
        os.replace(self.index_path, aside)
        for suffix in ("-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(self.index_path) + suffix)
        return aside

    # -- the writer's lock ------------------------------------------------------------------

    def lock(self) -> "ResultsStore":
        """Take the store's writer lock now (the server does, for its whole life); StoreLocked
        when another process writes the store. Returns self."""
        self._writable()
        return self

    def release(self) -> None:
        """Give the writer lock back (this process stops writing the store)."""
        release_lock(self.root)

    def _writable(self) -> None:
        """Every write goes through here: refuse on a read-only store, take the lock on the
        first write of this process and then mark what a dead writer left running."""
        if self.read_only:
            raise StoreReadOnly(f"the results store {self.root} is open read-only; open it "
                                "without --read-only (after stopping the process that writes it) "
                                "to change it.")
        if acquire_lock(self.root):
            self._mark_interrupted()

    def _mark_interrupted(self) -> None:
        """Runs still "running" when this process takes the lock lost their writer."""
        for row in self.runs(limit=1_000_000):
            if row["status"] != "running":
                continue
            with contextlib.suppress(StoreError, OSError):
                run = self.get(row["key"])
                if run.status == "running":
                    run.set_status("interrupted", INTERRUPTED_RUN)

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.root)!r})"

    # -- index plumbing -------------------------------------------------------------------

    def _index_error(self, exc: Exception) -> StoreError:
        return StoreError(f"{self.index_path} is not a usable index ({exc}); delete it and run "
                          f"`python -m analysis store reindex --out {self.root}` (the index is "
                          "rebuilt from the run folders).")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A fresh connection per use: safe across threads and processes."""
        try:
            conn = sqlite3.connect(self.index_path, timeout=30.0, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._index_error(exc) from exc
        try:
            try:
                conn.execute("PRAGMA busy_timeout = 30000")
                conn.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError:  # another connection holds a lock; WAL is sticky
                pass
            except sqlite3.DatabaseError as exc:
                raise self._index_error(exc) from exc
            conn.row_factory = sqlite3.Row
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """An IMMEDIATE transaction: holds the store's write lock until it commits."""
        with self._connect() as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.DatabaseError as exc:
                raise self._index_error(exc) from exc
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _row(self, run: Run, cells_done: int | None = None) -> dict:
        state = run._status_file()
        status, error = state["status"], state.get("error")
        try:
            metrics = run.metrics()
        except StoreError:
            # Still listed (its cells are intact), marked so it is not taken for a result.
            metrics, status, error = None, "incomplete", INCOMPLETE_RUN
        files = list(run._cell_files())
        if cells_done is None:
            cells_done = len(files)
        total = state.get("cells_total")
        if status == "complete" and total is not None and cells_done < total:
            status, error = "incomplete", INCOMPLETE_RUN
        newest = max((p.stat().st_mtime for p in files), default=None)
        updated = max(state.get("updated") or run.created,
                      _iso(newest) if newest is not None else "")
        return {"key": run.key, "kind": run.kind, "status": status,
                "error": error, "created": run.created,
                "updated": updated, "cells_done": cells_done,
                "cells_total": state.get("cells_total"), "config": canonical_json(run.config),
                "metrics": None if metrics is None else canonical_json(metrics)}

    def _upsert(self, conn: sqlite3.Connection, run: Run, cells_done: int | None = None) -> None:
        row = self._row(run, cells_done)
        cols = ", ".join(row)
        conn.execute(f"INSERT OR REPLACE INTO runs ({cols}) VALUES ({', '.join('?' * len(row))})",
                     tuple(row.values()))

    def _sync_count(self, run: Run, cells_done: int) -> None:
        with self._connect() as conn:
            cur = conn.execute("UPDATE runs SET cells_done = ? WHERE key = ? AND cells_done != ?",
                               (cells_done, run.key, cells_done))
            if cur.rowcount == 0 and conn.execute(
                    "SELECT 1 FROM runs WHERE key = ?", (run.key,)).fetchone() is None:
                with self._transaction() as tx:
                    self._upsert(tx, run, cells_done)

    # -- folders --------------------------------------------------------------------------

    def _run_folders(self) -> Iterator[Path]:
        with os.scandir(self.runs_dir) as it:
            for entry in it:
                if entry.is_dir() and not entry.name.startswith("."):
                    yield Path(entry.path)

    def _load(self, path: Path) -> Run:
        """The run in `path`, checked: its config.yaml must hash to the key in its name."""
        match = _RUN_FOLDER.fullmatch(path.name)
        if not match:
            raise StoreError(f"{path} is not a run folder (expected <kind>-<16 hex key>); "
                             "remove it from the store's runs/ folder.")
        config_path = path / "config.yaml"
        try:
            data = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise StoreError(f"{config_path} is missing, so {path.name} is not a complete run; "
                             f"{_fix_hint(path)}.") from exc
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise StoreError(f"{config_path} is corrupt ({_why(exc)}); "
                             f"{_fix_hint(path)}.") from exc
        if (not isinstance(data, dict) or not isinstance(data.get("config"), dict)
                or not isinstance(data.get("kind"), str)):
            raise StoreError(f"{config_path} is not a run config (expected kind, key, created, "
                             f"config); {_fix_hint(path)}.")
        kind, config = data["kind"], data["config"]
        if kind != match["kind"] or run_key(kind, config) != match["key"]:
            raise StoreError(f"{config_path} is foreign: its kind and config hash to "
                             f"{kind}-{run_key(kind, config)}, not to the folder name {path.name} "
                             f"(edited by hand or copied from another run); {_fix_hint(path)}.")
        for sub in ("cells", "arrays"):
            (path / sub).mkdir(exist_ok=True)
            clean_tmp(path / sub)
        clean_tmp(path)
        return Run(self, path, kind, match["key"], config, str(data.get("created") or ""))

    def open_run(self, kind: str, config: dict) -> Run:
        """The run of (kind, config), created on first use. Idempotent and safe to race."""
        self._writable()
        if not isinstance(kind, str) or not _KIND.fullmatch(kind):
            raise ValueError(f"run kind {kind!r} must match [A-Za-z0-9_]+ (e.g. 'needle')")
        if not isinstance(config, dict):
            raise ValueError(f"a run config must be a dict, got {type(config).__name__}")
        config = json.loads(canonical_json(config))
        key = run_key(kind, config)
        path = self.runs_dir / f"{kind}-{key}"
        if not (path / "config.yaml").exists():
            self._create(path, kind, key, config)
        run = self._load(path)
        with self._connect() as conn:
            known = conn.execute("SELECT 1 FROM runs WHERE key = ?", (key,)).fetchone()
        if not known:
            with self._transaction() as conn:
                self._upsert(conn, run)
        return run

    def _create(self, path: Path, kind: str, key: str, config: dict) -> None:
        # Build the folder aside and rename it into place: a run folder is complete or absent.
        staging = self.runs_dir / f".{path.name}.{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        staging.mkdir()
        try:
            (staging / "cells").mkdir()
            (staging / "arrays").mkdir()
            text = yaml.safe_dump({"kind": kind, "key": key, "created": _now(), "config": config},
                                  sort_keys=True, allow_unicode=True, default_flow_style=False)
            atomic_write_text(staging / "config.yaml", text)
            atomic_write_text(staging / "status.json", _dump_json(
                {"status": "running", "error": None, "cells_total": None, "updated": _now()},
                indent=2))
            try:
                os.rename(staging, path)
            except OSError:
                if not (path / "config.yaml").exists():
                    raise
            _fsync_dir(self.runs_dir)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def _find(self, key: str) -> Path:
        if not isinstance(key, str):
            raise StoreError(f"a run key must be a string, got {key!r}")
        if _RUN_FOLDER.fullmatch(key):
            path = self.runs_dir / key
            if path.is_dir():
                return path
        elif re.fullmatch(r"[0-9a-f]{16}", key):
            found = sorted(self.runs_dir.glob(f"*-{key}"))
            if found:
                return found[0]
        raise StoreError(f"no run {key!r} in {self.runs_dir}; list the runs with "
                         f"`python -m analysis store list --out {self.root}`.")

    def get(self, key: str) -> Run:
        """The run with this key (16 hex digits, or "<kind>-<key>")."""
        return self._load(self._find(key))

    def runs(self, kind: str | None = None, limit: int = 200) -> list[dict]:
        """Index rows, newest first."""
        sql = "SELECT * FROM runs"
        args: list = []
        if kind is not None:
            sql += " WHERE kind = ?"
            args.append(kind)
        sql += " ORDER BY created DESC, rowid DESC LIMIT ?"
        args.append(int(limit))
        with self._connect() as conn:
            try:
                rows = conn.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as exc:
                raise self._index_error(exc) from exc
        out = []
        for row in rows:
            item = dict(row)
            item["config"] = json.loads(item["config"])
            item["metrics"] = None if item["metrics"] is None else json.loads(item["metrics"])
            out.append(item)
        return out

    def delete(self, key: str) -> None:
        self._writable()
        path = self._find(key)
        match = _RUN_FOLDER.fullmatch(path.name)
        # Rename first: a half-deleted folder must not look like a run.
        trash = self.runs_dir / f".{path.name}.{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        os.rename(path, trash)
        with self._transaction() as conn:
            conn.execute("DELETE FROM runs WHERE key = ?", (match["key"],))
        shutil.rmtree(trash, ignore_errors=True)

    def scan(self) -> tuple[list[Run], list[tuple[Path, str]]]:
        """Every run folder: the valid runs, and (folder, reason) for the ones that are not."""
        good, bad = [], []
        for path in sorted(self._run_folders()):
            try:
                run = self._load(path)
                run._status_file()
                good.append(run)
            except StoreError as exc:
                bad.append((path, str(exc)))
        return good, bad

    def reindex(self) -> int:
        """Rebuild the index from the run folders (counting intact cells only); returns how
        many runs it holds. Broken folders are left out with a warning (see `scan()`), runs
        with damaged or missing cells or metrics are listed as "incomplete" (see `verify()`)."""
        self._writable()
        return self._rebuild_index()

    def _rebuild_index(self) -> int:
        good, bad = self.scan()
        for path, reason in bad:
            log.warning("reindex: skipping %s: %s", path, reason)
        with self._transaction() as conn:
            conn.execute("DELETE FROM runs")
            for run in good:
                self._upsert(conn, run, cells_done=len(run.inspect()[0]))
        return len(good)

    def verify(self, repair: bool = False) -> list[Problem]:
        """Every problem in the store's runs (damaged or missing cells, unreadable metrics,
        broken folders). `repair=True` moves damaged files aside and marks those runs
        incomplete, so running their jobs again recomputes exactly what is missing."""
        if repair:
            self._writable()
        good, bad = self.scan()
        problems = [Problem(path.name, "broken run", path.name, reason) for path, reason in bad]
        for run in good:
            found = run.problems()
            problems += found
            if repair and found:
                run.repair(found)
        if repair:
            self._rebuild_index()
        return problems

    def import_runs(self, folder: str | os.PathLike) -> int:
        """Copy the finished runs in `folder` (a store root or its runs/ folder, e.g. shipped
        assets) that this store lacks; returns how many were copied. Every run is validated
        first (config hashes to its name, every cell and metrics file parses): a broken one
        raises StoreError and nothing is copied."""
        self._writable()
        source = Path(folder)
        if (source / "runs").is_dir():
            source = source / "runs"
        if not source.is_dir():
            raise StoreError(f"{source} is not a folder of runs; give a results folder (with "
                             "runs/ inside) or its runs/ folder.")
        if source.resolve() == self.runs_dir.resolve():
            return 0
        other = _ReadOnlyStore(source)
        finished = []
        for path in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")):
            run = other.load(path)
            run.done()
            run.metrics()
            if run.status == "complete":
                finished.append(run)
        copied = 0
        for run in finished:
            target = self.runs_dir / run.name
            if target.exists():
                continue
            staging = self.runs_dir / f".{run.name}.{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
            shutil.copytree(run.path, staging,
                            ignore=shutil.ignore_patterns(".*.tmp"))
            try:
                os.rename(staging, target)
                copied += 1
            except OSError:
                if not target.exists():
                    raise
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
            imported = self._load(target)
            with self._transaction() as conn:
                self._upsert(conn, imported)
        return copied


class _ReadOnlyStore:
    """Validates run folders outside a store (import sources) without creating an index."""

    def __init__(self, runs_dir: Path):
        self.runs_dir = runs_dir

    def load(self, path: Path) -> Run:
        match = _RUN_FOLDER.fullmatch(path.name)
        if not match:
            raise StoreError(f"{path} is not a run folder (expected <kind>-<16 hex key>); "
                             "remove it from the folder you import.")
        config_path = path / "config.yaml"
        try:
            data = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise StoreError(f"{config_path} is missing or corrupt ({_why(exc)}); "
                             "fix or remove that run from the folder you import.") from exc
        if (not isinstance(data, dict) or not isinstance(data.get("config"), dict)
                or data.get("kind") != match["kind"]
                or run_key(match["kind"], data["config"]) != match["key"]):
            raise StoreError(f"{config_path} is foreign: it does not hash to {path.name}; "
                             "fix or remove that run from the folder you import.")
        return Run(self, path, match["kind"], match["key"], data["config"],
                   str(data.get("created") or ""))

    def _sync_count(self, run: Run, cells_done: int) -> None:
        """Import sources have no index to keep in step."""

    def _writable(self) -> None:
        raise StoreReadOnly(f"{self.runs_dir} is an import source: it is read, never written.")
