"""The results store: keys, atomic files, crash leftovers, corrupt and foreign files, the index
under concurrent writers, import and reindex, and the `store` CLI."""
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.cli import store as cli_store
from analysis.results.store import (ResultsStore, StoreError, canonical_json, project_commit, run_key,
                                    safe_name)

REPO = Path(__file__).resolve().parent.parent

CONFIG = {
    "model": {"name": "smollm2-135m-instruct", "revision": "gguf-sha256:b179c9523d0e6a0f",
              "dtype": "bfloat16", "attn_implementation": "sdpa"},
    "methods": [{"name": "faedkv", "compression_ratio": 0.75,
                 "params": {"variant": "iwdft", "key_space": "post_rope", "window": 64}}],
    "task": {"needle": "sentence", "lengths": [1024, 2048], "depths": [0, 50, 100],
             "query_mode": "query_agnostic", "samples": 5},
    "seed": 0,
    "project_commit": "0123abcd",
}


def leaves(obj, path=()):
    """Every (path, value) leaf of a nested dict/list."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaves(v, path + (i,))
    else:
        yield path, obj


def changed(obj, path, value):
    obj = json.loads(json.dumps(obj))
    target = obj
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    return obj


def other_value(v):
    if isinstance(v, bool):
        return not v
    if isinstance(v, (int, float)):
        return v + 1
    return v + "x"


# ------------------------------------------------------------------------------------ keys


def test_run_key_is_canonical_and_covers_every_field():
    key = run_key("needle", CONFIG)
    assert len(key) == 16 and int(key, 16) >= 0
    reordered = json.loads(json.dumps(CONFIG, sort_keys=True))
    reordered = dict(reversed(list(reordered.items())))
    assert run_key("needle", reordered) == key
    assert run_key("suite", CONFIG) != key
    keys = {key}
    paths = list(leaves(CONFIG))
    assert len(paths) >= 15
    for path, value in paths:
        keys.add(run_key("needle", changed(CONFIG, path, other_value(value))))
    assert len(keys) == len(paths) + 1, "some field does not reach the key"
    # Adding a field changes it too; NaN is keyed as None (JSON has no NaN).
    assert run_key("needle", {**CONFIG, "extra": None}) != key
    assert run_key("k", {"x": float("nan")}) == run_key("k", {"x": None})
    assert run_key("k", {"x": np.float32(0.5)}) == run_key("k", {"x": 0.5})


def test_canonical_json_rejects_what_json_cannot_hold():
    with pytest.raises(ValueError, match="cannot be stored as JSON"):
        canonical_json({"x": object()})
    with pytest.raises(ValueError, match="JSON keys must be strings"):
        canonical_json({1: 2})


def test_project_commit(tmp_path):
    assert project_commit(tmp_path) == "unknown"
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    (repo / "a.txt").write_text("1")
    subprocess.run(git + ["add", "a.txt"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "a"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    (repo / "untracked.txt").write_text("ignored: only tracked files make it dirty")
    assert project_commit(repo) == head
    dirty = tmp_path / "dirty"
    subprocess.run(["git", "clone", "-q", str(repo), str(dirty)], check=True)
    (dirty / "a.txt").write_text("2")
    assert project_commit(dirty) == head + "+dirty"
    # project_commit() is cached per process (a run is keyed on the commit it started with);
    # others may commit while the suite runs, so compare a fresh reading with HEAD now.
    from analysis.results.store import _commit_of

    _commit_of.cache_clear()
    assert project_commit().split("+")[0] == subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
        check=True).stdout.strip()


def test_safe_name_keeps_readable_ids_and_hashes_the_rest():
    assert safe_name("len=1024.depth=50.snapkv@0.75".replace("@", "-")) == \
        "len=1024.depth=50.snapkv-0.75"
    for bad in ("a/b", "..", ".hidden", "x" * 121, "naïve", "a b"):
        name = safe_name(bad)
        assert name.startswith("~") and len(name) == 33
    assert safe_name("a/b") != safe_name("a/c")
    with pytest.raises(ValueError):
        safe_name("")


# ------------------------------------------------------------------------------------ runs


def test_open_run_is_idempotent_and_files_round_trip(tmp_path):
    store = ResultsStore(tmp_path)
    assert (tmp_path / "runs").is_dir() and (tmp_path / "index.sqlite").is_file()
    run = store.open_run("needle", CONFIG)
    assert run.path == tmp_path / "runs" / f"needle-{run_key('needle', CONFIG)}"
    first = (run.path / "config.yaml").read_bytes()
    again = store.open_run("needle", json.loads(json.dumps(CONFIG)))
    assert again.path == run.path and (run.path / "config.yaml").read_bytes() == first
    assert len(store.runs()) == 1 and run.status == "running" and run.config == CONFIG

    stored = run.put("c/1", {"score": float("nan"), "n": np.int64(3), "v": np.arange(2)})
    assert stored == {"score": None, "n": 3, "v": [0, 1]}
    run.put("c2", {"score": 1.0})
    run.put("c2", {"score": 0.5})  # rewriting a cell replaces it
    assert run.done() == {"c/1": stored, "c2": {"score": 0.5}}
    assert [r["cell_id"] for r in run.records()] == ["c/1", "c2"]
    assert sorted(p.name for p in (run.path / "cells").iterdir())[0] == "c2.json"
    assert store.runs()[0]["cells_done"] == 2

    run.put_array("spectrum", freqs=np.linspace(0, 0.5, 5), power=np.ones((2, 5), np.float32))
    arrays = store.get(run.key).get_array("spectrum")
    assert arrays["power"].dtype == np.float32 and arrays["freqs"][-1] == 0.5
    with pytest.raises(StoreError, match="no array 'other'"):
        run.get_array("other")

    run.write_predictions([{"cell": "a", "answer": "x, \"y\"", "extra": {"k": 1}},
                           {"cell": "b", "score": float("nan")}])
    frame = pd.read_csv(run.path / "predictions.csv")
    assert list(frame.columns) == ["cell", "answer", "extra", "score"]
    assert frame["answer"][0] == 'x, "y"' and json.loads(frame["extra"][0]) == {"k": 1}
    assert math.isnan(frame["score"][1])

    assert run.metrics() is None
    run.set_total(2)
    run.write_metrics({"accuracy": 0.75, "ci": [0.5, float("inf")]})
    assert run.metrics() == {"accuracy": 0.75, "ci": [0.5, None]}
    row = store.runs()[0]
    assert (row["status"], row["metrics"]["accuracy"], row["cells_total"]) == ("complete", 0.75, 2)
    assert json.loads((run.path / "metrics.json").read_text())["ci"][1] is None

    run.set_status("failed", "boom")
    assert (store.get(run.name).status, store.get(run.name).error) == ("failed", "boom")
    with pytest.raises(ValueError, match="unknown run status"):
        run.set_status("done")


def test_runs_filters_sorts_limits_and_delete(tmp_path):
    store = ResultsStore(tmp_path)
    made = [store.open_run("needle" if i % 2 else "suite", {"i": i}) for i in range(5)]
    assert [r["key"] for r in store.runs()] == [r.key for r in reversed(made)]
    assert [r["config"]["i"] for r in store.runs(kind="needle")] == [3, 1]
    assert len(store.runs(limit=2)) == 2
    store.delete(made[0].key)
    store.delete(made[1].name)
    assert not made[0].path.exists() and len(store.runs()) == 3
    with pytest.raises(StoreError, match="no run"):
        store.get(made[0].key)
    with pytest.raises(StoreError, match="no run"):
        store.delete("suite-0000000000000000")
    with pytest.raises(ValueError, match="kind"):
        store.open_run("needle-x", {})


# ------------------------------------------------------------------------- crash leftovers


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftover_tmp_files_are_ignored_and_cleaned(tmp_path):
    store = ResultsStore(tmp_path)
    run = store.open_run("needle", CONFIG)
    run.put("a", {"x": 1})
    from analysis.results.store import _HOST

    # What a writer killed between write and rename leaves: a half-written temporary file.
    stale = run.path / "cells" / f".b.json.{_HOST}-{dead_pid()}-0badf00d.tmp"
    stale.write_text('{"cell_id": "b", "rec')
    live = run.path / "cells" / f".c.json.{_HOST}-{os.getpid()}-0badf00d.tmp"
    live.write_text('{"cell_id": "c", "rec')  # a writer in this (live) process: kept
    stale_run = tmp_path / "runs" / f".needle-0123456789abcdef.{_HOST}-{dead_pid()}-0badf00d.tmp"
    stale_run.mkdir()
    assert run.done() == {"a": {"x": 1}} and stale.exists()
    assert store.get(run.key).done() == {"a": {"x": 1}}
    assert not stale.exists() and live.exists()
    ResultsStore(tmp_path)
    assert not stale_run.exists()
    assert store.reindex() == 1


def test_truncated_and_corrupt_files_raise_store_error_naming_the_file(tmp_path):
    store = ResultsStore(tmp_path)
    run = store.open_run("needle", CONFIG)
    run.put("a", {"x": 1})
    cell = run.path / "cells" / "a.json"
    cell.write_text(cell.read_text()[:20])
    with pytest.raises(StoreError, match=r"a\.json is corrupt.*delete a\.json to recompute"):
        run.done()
    cell.write_text(json.dumps({"cell_id": "other", "record": {}}))
    with pytest.raises(StoreError, match="belongs in another file"):
        run.done()
    cell.unlink()
    assert run.done() == {}

    (run.path / "metrics.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"metrics\.json is corrupt.*rebuild metrics\.json"):
        run.metrics()
    (run.path / "metrics.json").unlink()

    run.put_array("m", x=np.zeros(3))
    (run.path / "arrays" / "m.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(StoreError, match=r"m\.npz is corrupt"):
        run.get_array("m")

    (run.path / "status.json").write_text('{"status": "exploded"}')
    with pytest.raises(StoreError, match=r"status\.json is not a run status"):
        run.status

    (run.path / "config.yaml").write_text("config: [unclosed")
    with pytest.raises(StoreError, match=r"config\.yaml is corrupt.*delete the run"):
        store.get(run.key)


def test_foreign_run_folder_is_an_error(tmp_path):
    store = ResultsStore(tmp_path)
    run = store.open_run("needle", CONFIG)
    text = (run.path / "config.yaml").read_text().replace("seed: 0", "seed: 1")
    (run.path / "config.yaml").write_text(text)
    with pytest.raises(StoreError, match=r"config\.yaml is foreign"):
        store.get(run.key)
    with pytest.raises(StoreError, match="foreign"):
        store.open_run("needle", CONFIG)
    (tmp_path / "runs" / "not-a-run").mkdir()
    good, bad = store.scan()
    assert good == [] and {p.name for p, _ in bad} == {run.name, "not-a-run"}


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_index_is_moved_aside_and_rebuilt(tmp_path, damage):
    store = ResultsStore(tmp_path)
    run = store.open_run("needle", CONFIG)
    run.set_total(2)
    run.put("a", {"x": 1})
    before = store.runs()
    index = tmp_path / "index.sqlite"
    for suffix in ("-wal", "-shm"):       # a checkpointed file, then damaged
        Path(str(index) + suffix).unlink(missing_ok=True)
    data = index.read_bytes()
    index.write_bytes(b"this is not sqlite" * 100 if damage == "garbage" else data[:len(data) // 3])
    reopened = ResultsStore(tmp_path)
    assert len(reopened.repairs) == 1 and "rebuilt the index" in reopened.repairs[0]
    assert [r["key"] for r in reopened.runs()] == [r["key"] for r in before]
    assert reopened.runs()[0]["cells_done"] == 1
    assert list(tmp_path.glob("index.sqlite.damaged-*"))      # kept for inspection
    assert ResultsStore(tmp_path).repairs == []
    # damaged while a process has the store open: the next read that fails rebuilds it
    index.write_bytes(b"junk" * 300)
    with pytest.raises(StoreError, match="not a usable index"):
        reopened.runs()
    with pytest.raises(StoreError):
        ResultsStore(tmp_path, read_only=True)          # a reader never moves files
    reopened.repair_index(StoreError("read failed"))
    assert [r["key"] for r in reopened.runs()] == [r["key"] for r in before]


# ---------------------------------------------------------------------- index is derivable


def test_reindex_and_automatic_rebuild_give_the_same_rows(tmp_path):
    store = ResultsStore(tmp_path)
    for i in range(3):
        run = store.open_run("ppl", {"i": i})
        run.set_total(4)
        for c in range(i + 1):
            run.put(f"c{c}", {"nll": c / 3})
        if i == 2:
            run.write_metrics({"ppl": 12.5})
    before = store.runs()
    assert store.reindex() == 3 and store.runs() == before
    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    assert ResultsStore(tmp_path).runs() == before


def test_import_runs_copies_finished_valid_runs_once(tmp_path):
    shipped = ResultsStore(tmp_path / "assets")
    finished = shipped.open_run("needle", CONFIG)
    finished.put("a", {"correct": True})
    finished.put_array("grid", acc=np.eye(2))
    finished.write_metrics({"accuracy": 1.0})
    shipped.open_run("needle", {**CONFIG, "seed": 7}).put("a", {"correct": False})  # unfinished

    mine = ResultsStore(tmp_path / "results")
    assert mine.import_runs(tmp_path / "assets") == 1
    assert mine.import_runs(tmp_path / "assets" / "runs") == 0
    run = mine.get(finished.key)
    assert run.done() == {"a": {"correct": True}} and run.metrics() == {"accuracy": 1.0}
    assert mine.runs()[0]["status"] == "complete" and mine.runs()[0]["cells_done"] == 1

    (finished.path / "cells" / "a.json").write_text("{")
    other = ResultsStore(tmp_path / "other")
    with pytest.raises(StoreError, match=r"a\.json is corrupt"):
        other.import_runs(tmp_path / "assets")
    assert other.runs() == []


# ---------------------------------------------------------------------------- concurrency


def test_threads_writing_one_store_keep_the_index_consistent(tmp_path):
    store = ResultsStore(tmp_path)
    shared = store.open_run("needle", CONFIG)
    errors = []

    def writer(t):
        try:
            own = ResultsStore(tmp_path).open_run("suite", {"thread": t})
            for i in range(15):
                shared.put(f"t{t}-c{i}", {"t": t, "i": i})
                own.put(f"c{i}", {"i": i})
                if i % 5 == 0:
                    shared.set_status("running")
            own.write_metrics({"t": t})
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    rows = {r["key"]: r for r in store.runs()}
    assert len(rows) == 7
    assert rows[shared.key]["cells_done"] == 90 == len(shared.done())
    assert all(r["status"] == "complete" and r["cells_done"] == 15
               for k, r in rows.items() if k != shared.key)


WRITER = textwrap.dedent("""
    import sys
    from analysis.results.store import ResultsStore
    root, name = sys.argv[1], sys.argv[2]
    store = ResultsStore(root)
    shared = store.open_run("needle", {"shared": True})
    for i in range(60):
        shared.put(f"{name}-{i}", {"i": i})
        run = store.open_run("suite", {"writer": name, "i": i % 4})
        run.put(f"c{i}", {"i": i})
        if i % 10 == 0:
            store.runs()
    shared.set_status("running")
""")


def test_processes_writing_one_store_one_after_the_other_keep_the_index_consistent(tmp_path):
    """One writer per store: each process holds the lock while it writes, then exits."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name in ("p", "q"):
        proc = subprocess.run([sys.executable, str(script), str(tmp_path / "r"), name], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    store = ResultsStore(tmp_path / "r")
    rows = store.runs()
    assert len(rows) == 9
    shared = store.open_run("needle", {"shared": True})
    by_key = {r["key"]: r for r in rows}
    assert by_key[shared.key]["cells_done"] == 120 == len(shared.done())
    for row in rows:
        assert row["cells_done"] == len(store.get(row["key"]).done())
    before = store.runs()
    store.reindex()
    assert sorted(store.runs(), key=lambda r: r["key"]) == sorted(before, key=lambda r: r["key"])


# ------------------------------------------------------------------------------------- CLI


def test_store_cli_list_show_delete_reindex(tmp_path, capsys):
    store = ResultsStore(tmp_path)
    run = store.open_run("needle", CONFIG)
    run.set_total(3)
    run.put("a", {"x": 1})
    run.write_metrics({"accuracy": 0.5, "table": [1, 2]})
    out = str(tmp_path)

    assert cli_store.main(["list", "--out", out]) == 0
    listing = capsys.readouterr().out
    # marked complete with 2 of its 3 cells missing: listed as incomplete
    assert run.name in listing and "incomplete" in listing and "1/3" in listing
    assert "accuracy=0.5" in listing and "table" not in listing

    assert cli_store.main(["store", "show", run.key, "--out", out]) == 0
    shown = capsys.readouterr().out
    assert "smollm2-135m-instruct" in shown and '"accuracy": 0.5' in shown

    (tmp_path / "runs" / "junk").mkdir()
    assert cli_store.main(["reindex", "--out", out]) == 1
    assert "indexed 1 run(s)" in capsys.readouterr().out

    assert cli_store.main(["delete", run.key, "--out", out]) == 0
    assert cli_store.main(["show", run.key, "--out", out]) == 2
    assert "no run" in capsys.readouterr().err
    assert cli_store.main(["list", "--out", out]) == 0
    assert "no runs" in capsys.readouterr().out


# ------------------------------------------------------------- one writer, integrity, repair


LOCKER = textwrap.dedent("""
    import sys
    from analysis.results.store import ResultsStore, StoreLocked
    store = ResultsStore(sys.argv[1])
    print(len(store.runs()))                      # reading needs no lock
    try:
        store.open_run("needle", {"other": True})
    except StoreLocked as exc:
        print("LOCKED", exc)
        raise SystemExit(3)
    print("WROTE")
""")


def test_one_writer_per_store_and_read_only_stores(tmp_path):
    from analysis.results.store import StoreReadOnly, holds_lock, lock_holder

    store = ResultsStore(tmp_path / "r")
    store.open_run("needle", CONFIG)             # the first write takes the lock
    assert holds_lock(store.root) and lock_holder(store.root)["pid"] == os.getpid()
    script = tmp_path / "locker.py"
    script.write_text(LOCKER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script), str(store.root)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.startswith("1\n") and f"being written by process {os.getpid()}" in proc.stdout
    assert cli_store.main(["list", "--out", str(store.root)]) == 0
    store.release()
    assert lock_holder(store.root) is None
    proc = subprocess.run([sys.executable, str(script), str(store.root)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "WROTE" in proc.stdout, proc.stderr
    reader = ResultsStore(store.root, read_only=True)
    with pytest.raises(StoreReadOnly, match="read-only"):
        reader.open_run("needle", CONFIG)
    with pytest.raises(StoreReadOnly):
        reader.delete(run_key("needle", CONFIG))
    assert len(reader.runs()) == 2


def _grid(run, ids, calls):
    """What a task does (runner.run_cells + metrics from the records); counts computed cells."""
    from analysis.results.runner import run_cells

    def compute(cell):
        calls.append(cell["id"])
        return {"value": int(cell["id"][1:]) * 10}

    records = run_cells(run, [{"id": i} for i in ids], compute, show_progress=False)
    run.write_metrics({"total": sum(r["value"] for r in records.values())})


def test_verify_finds_damaged_and_missing_cells_and_resubmit_recomputes_exactly_those(tmp_path, capsys):
    store = ResultsStore(tmp_path)
    run = store.open_run("needle", CONFIG)
    ids = [f"c{i}" for i in range(16)]
    calls = []
    _grid(run, ids, calls)
    assert len(calls) == 16 and run.metrics() == {"total": 1200}
    assert store.verify() == [] and cli_store.main(["verify", "--out", str(tmp_path)]) == 0
    cells = run.path / "cells"
    (cells / "c1.json").write_text((cells / "c1.json").read_text()[:30])          # truncated
    edited = json.loads((cells / "c2.json").read_text())
    edited["record"]["value"] = 999                                                # valid, wrong
    (cells / "c2.json").write_text(json.dumps(edited))
    (cells / "c3.json").unlink()                                                   # missing
    (run.path / "metrics.json").write_text("{")                                    # corrupt
    capsys.readouterr()

    assert cli_store.main(["list", "--out", str(tmp_path)]) == 0
    assert "incomplete" in capsys.readouterr().out
    problems = store.verify()
    assert sorted((p.what, p.file) for p in problems) == [
        ("damaged cell", "c1.json"), ("damaged cell", "c2.json"),
        ("damaged metrics", "metrics.json"), ("missing cells", "cells/")]
    assert "does not match its checksum" in next(p.reason for p in problems if p.file == "c2.json")
    assert cli_store.main(["verify", "--out", str(tmp_path)]) == 1
    assert cli_store.main(["reindex", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "c2.json" in out and "damaged metrics" in out
    row = store.runs()[0]
    assert row["status"] == "incomplete" and row["cells_done"] == 13 and row["metrics"] is None

    calls.clear()
    _grid(store.get(run.key), ids, calls)          # the same job again
    assert sorted(calls) == ["c1", "c2", "c3"]       # exactly the missing and damaged cells
    assert run.metrics() == {"total": 1200}          # rebuilt from the cells, with the right c2
    assert store.verify() == [] and store.runs()[0]["status"] == "complete"
    assert sorted(p.name for p in cells.glob("*.damaged")) == ["c1.json.damaged", "c2.json.damaged"]


def test_verify_repair_marks_the_run_incomplete(tmp_path):
    store = ResultsStore(tmp_path)
    run = store.open_run("needle", CONFIG)
    _grid(run, ["c0", "c1"], [])
    (run.path / "cells" / "c0.json").write_text("{")
    assert len(store.verify(repair=True)) == 2            # damaged c0, and so a missing cell
    assert run.status == "incomplete"
    assert [p.what for p in store.verify()] == ["missing cells"]       # c0 was moved aside
    assert run.done() == {"c1": {"value": 10}}


def test_taking_the_lock_marks_runs_a_dead_writer_left_running_as_interrupted(tmp_path):
    script = tmp_path / "die.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        from analysis.results.store import ResultsStore
        run = ResultsStore(sys.argv[1]).open_run("needle", {"dies": True})
        run.set_total(4)
        run.set_status("running")
        run.put("a", {"x": 1})
        os._exit(9)                              # killed mid-grid: no status written
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, timeout=120)
    store = ResultsStore(tmp_path)
    assert store.runs()[0]["status"] == "running"         # reading changes nothing
    store.lock()
    row = store.runs()[0]
    assert row["status"] == "interrupted" and "run the same job" in row["error"]


def test_store_list_reads_the_cells_not_only_the_index(tmp_path, capsys):
    store = ResultsStore(tmp_path)
    run = store.open_run("needle", CONFIG)
    _grid(run, ["c0", "c1"], [])
    capsys.readouterr()
    assert cli_store.main(["list", "--out", str(tmp_path)]) == 0
    assert "complete" in capsys.readouterr().out
    cell = run.path / "cells" / "c1.json"
    cell.write_text(cell.read_text()[:-5])                 # truncated, the index does not know
    assert cli_store.main(["list", "--out", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert "incomplete" in listing and "1/2" in listing
