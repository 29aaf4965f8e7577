"""The grid runner: resume (also after a real SIGKILL), progress, failure, cancel, the Ray
executor on a local CPU instance, and ModelHandle pickling."""
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from analysis.results.runner import Cancelled, ModelHandle, ray_init, run_cells
from analysis.results.store import ResultsStore

REPO = Path(__file__).resolve().parent.parent


class Square:
    """A picklable compute: logs each call (one line per cell) so tests count them."""

    def __init__(self, log: Path, delay: float = 0.0, fail_on: str | None = None):
        self.log, self.delay, self.fail_on = str(log), delay, fail_on

    def __call__(self, cell: dict) -> dict:
        with open(self.log, "a") as f:
            f.write(cell["id"] + "\n")
        if cell["id"] == self.fail_on:
            raise ValueError(f"bad cell {cell['id']}")
        time.sleep(self.delay)
        return {"square": cell["x"] ** 2, "pid": os.getpid(), "nan": float("nan")}


def calls(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def grid(n: int) -> list[dict]:
    return [{"id": f"x={i}", "x": i} for i in range(n)]


def test_local_grid_writes_each_cell_and_resumes(tmp_path):
    store = ResultsStore(tmp_path / "r")
    run = store.open_run("grid", {"n": 6})
    log = tmp_path / "calls.log"
    run.put("x=4", {"square": 16, "pid": 0, "nan": None})     # finished by an earlier run
    seen = []

    def progress(done, total):
        seen.append((done, total, len(run.done())))

    records = run_cells(run, grid(6), Square(log), progress=progress, show_progress=False)
    assert list(records) == [f"x={i}" for i in range(6)]
    assert [r["square"] for r in records.values()] == [0, 1, 4, 9, 16, 25]
    assert records["x=1"]["nan"] is None
    assert calls(log) == ["x=0", "x=1", "x=2", "x=3", "x=5"]
    # Each progress call comes after that cell is on disk; resumed cells count as done.
    assert seen == [(1, 6, 1), (2, 6, 2), (3, 6, 3), (4, 6, 4), (5, 6, 5), (6, 6, 6)]
    assert store.runs()[0]["cells_total"] == 6 and store.runs()[0]["cells_done"] == 6

    again = run_cells(run, grid(6), Square(log), show_progress=False)
    assert again == records and len(calls(log)) == 5


def test_failing_cell_marks_run_failed_and_keeps_finished_cells(tmp_path):
    run = ResultsStore(tmp_path / "r").open_run("grid", {"n": 5})
    log = tmp_path / "calls.log"
    with pytest.raises(ValueError, match="bad cell x=3"):
        run_cells(run, grid(5), Square(log, fail_on="x=3"), show_progress=False)
    assert run.status == "failed" and "ValueError: bad cell x=3" in run.error
    assert sorted(run.done()) == ["x=0", "x=1", "x=2"]
    records = run_cells(run, grid(5), Square(log), show_progress=False)
    assert len(records) == 5 and calls(log) == ["x=0", "x=1", "x=2", "x=3", "x=3", "x=4"]
    assert run.status == "running"  # the caller writes metrics (status "complete")


def test_should_stop_cancels_between_cells(tmp_path):
    run = ResultsStore(tmp_path / "r").open_run("grid", {"n": 6})
    log = tmp_path / "calls.log"
    with pytest.raises(Cancelled):
        run_cells(run, grid(6), Square(log), should_stop=lambda: len(calls(log)) >= 2,
                  show_progress=False)
    assert run.status == "cancelled" and calls(log) == ["x=0", "x=1"]
    assert sorted(run.done()) == ["x=0", "x=1"]


def test_bad_arguments_are_value_errors(tmp_path):
    run = ResultsStore(tmp_path / "r").open_run("grid", {})
    compute = Square(tmp_path / "calls.log")
    with pytest.raises(ValueError, match="unknown executor 'dask'"):
        run_cells(run, grid(2), compute, executor="dask")
    with pytest.raises(ValueError, match="occurs twice"):
        run_cells(run, grid(2) + grid(1), compute)
    with pytest.raises(ValueError, match="needs a non-empty string 'id'"):
        run_cells(run, [{"x": 1}], compute)
    with pytest.raises(ValueError, match="must be a dict"):
        run_cells(run, grid(1), lambda cell: [1, 2], show_progress=False)
    assert run.status == "failed"


KILLED = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[4])
    from analysis.results.runner import run_cells
    from analysis.results.store import ResultsStore
    from test_runner import Square, grid
    root, log, delay = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
    run = ResultsStore(root).open_run("grid", {"n": 30})
    records = run_cells(run, grid(30), Square(log, delay=delay), show_progress=False)
    run.write_metrics({"sum": sum(r["square"] for r in records.values())})
""")


def test_sigkill_mid_grid_then_rerun_recomputes_only_missing_cells(tmp_path):
    script = tmp_path / "grid.py"
    script.write_text(KILLED)
    root, log = tmp_path / "r", tmp_path / "calls.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, str(script), str(root), str(log)]
    proc = subprocess.Popen(args + ["0.2", str(Path(__file__).parent)], env=env)
    cells_dir = None
    deadline = time.monotonic() + 300  # only bounds a hung child; not a performance limit
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((root / "runs").glob("grid-*/cells")) if (root / "runs").exists() else []
        if found and len(list(found[0].glob("*.json"))) >= 6:
            cells_dir = found[0]
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert cells_dir is not None and proc.returncode == -signal.SIGKILL

    store = ResultsStore(root)
    run = store.get(cells_dir.parent.name)
    done = run.done()  # every file parses: nothing is corrupt
    first = calls(log)
    assert 6 <= len(done) < 30 and run.status == "running" and run.metrics() is None
    # The killed process computed exactly the stored cells, plus at most the one in flight.
    assert set(done) <= set(first) and len(first) - len(done) in (0, 1)
    assert all(r["square"] == int(cid[2:]) ** 2 for cid, r in done.items())

    subprocess.run(args + ["0", str(Path(__file__).parent)], env=env, check=True)
    second = calls(log)[len(first):]
    assert sorted(second) == sorted(set(f"x={i}" for i in range(30)) - set(done))
    run = store.get(run.key)
    assert len(run.done()) == 30 and run.status == "complete"
    assert run.metrics() == {"sum": sum(i * i for i in range(30))}
    assert [p.name for p in run.path.rglob("*.tmp")] == []
    assert store.runs()[0]["cells_done"] == 30


def test_ray_executor_runs_resumes_fails_and_cancels(tmp_path):
    import ray

    # Workers must import analysis and this test module from the driver's folders.
    ray_init(num_cpus=2)
    try:
        store = ResultsStore(tmp_path / "r")
        run = store.open_run("grid", {"ray": 1})
        run.put("x=0", {"square": 0, "pid": 0, "nan": None})
        run.put("x=5", {"square": 25, "pid": 0, "nan": None})
        log, seen = tmp_path / "calls.log", []
        records = run_cells(run, grid(8), Square(log), executor="ray", show_progress=False,
                            progress=lambda done, total: seen.append((done, total)))
        assert [r["square"] for r in records.values()] == [i * i for i in range(8)]
        assert sorted(calls(log)) == ["x=1", "x=2", "x=3", "x=4", "x=6", "x=7"]
        assert {records[f"x={i}"]["pid"] for i in (1, 2, 3, 4, 6, 7)}.isdisjoint({os.getpid()})
        assert seen == [(d, 8) for d in range(2, 9)] and len(run.done()) == 8

        failing = store.open_run("grid", {"ray": 2})
        with pytest.raises(ValueError, match="bad cell x=2"):
            run_cells(failing, grid(4), Square(tmp_path / "f.log", fail_on="x=2"),
                      executor="ray", show_progress=False)
        assert failing.status == "failed" and "ValueError: bad cell x=2" in failing.error
        assert "x=2" not in failing.done()

        stopped = store.open_run("grid", {"ray": 3})
        slow = tmp_path / "slow.log"
        with pytest.raises(Cancelled):
            run_cells(stopped, grid(12), Square(slow, delay=0.3), executor="ray",
                      show_progress=False, should_stop=lambda: len(stopped.done()) >= 2)
        assert stopped.status == "cancelled"
        assert 2 <= len(stopped.done()) < 12 and len(calls(slow)) < 12
    finally:
        ray.shutdown()


def test_model_handle_pickles_as_arguments_and_loads_once(tmp_path):
    handle = ModelHandle("tiny-random-llama", device="cpu", dtype="float32")
    blob = pickle.dumps(handle)
    assert b"tiny-random-llama" in blob and len(blob) < 1000  # no weights travel
    loaded = handle.get()
    assert loaded.info.name == "tiny-random-llama" and handle.get() is loaded
    copy = pickle.loads(pickle.dumps(handle))
    assert copy == handle and copy.get() is loaded  # same process: the cached model

    reused = ModelHandle.from_loaded(loaded)
    assert reused.get() is loaded
    assert reused.args == ("tiny-random-llama", "cpu", "float32", "sdpa")
    shipped = pickle.loads(pickle.dumps(reused))
    ModelHandle.clear_cache()
    fresh = shipped.get()  # what a Ray worker does: loads by the arguments
    assert fresh is not loaded and fresh.info.key == loaded.info.key
    ModelHandle.clear_cache()
