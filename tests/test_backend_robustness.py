"""The backend against what goes wrong around it (real servers on loopback, tiny random Llama):
a second server or the CLI on a store a server writes, damaged files at start-up, kill -9 at
several points of a grid, stale run statuses, tokens and Host headers, the queue limit."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from analysis.api.client import BackendError, free_port
from analysis.results.store import ResultsStore
from tests.test_server import GENERATE, REPO, TINY, needle, start_backend, wait_until


def run_python(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FAEDKV_TOKEN"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def server_args(store, *extra: str) -> list[str]:
    return ["-m", "analysis.service.server", "--model", TINY, "--device", "cpu", "--port",
            str(free_port()), "--store", str(store), "--import-assets", "", *extra]


def test_one_writer_per_store_second_server_cli_and_read_only(tmp_path):
    first = start_backend(tmp_path, extra_args=("--max-queued", "2"))
    try:
        c = first.client
        done = c.wait(c.submit("spectra", {"num_tokens": 64, "grid_points": 17, "chunks": 4})["id"])
        key = done["run_key"]
        second = run_python(*server_args(tmp_path))
        assert second.returncode == 2
        assert "is being written by process" in second.stderr and "--read-only" in second.stderr
        cli = run_python("-m", "analysis", "store", "delete", key, "--out", str(tmp_path))
        assert cli.returncode == 2 and "one writer per store" in cli.stderr
        listing = run_python("-m", "analysis", "store", "list", "--out", str(tmp_path))
        assert listing.returncode == 0 and key in listing.stdout

        reader = start_backend(tmp_path, extra_args=("--read-only",))
        try:
            r = reader.client
            assert r.health()["read_only"] is True and r.run(key)["status"] == "complete"
            for call in (lambda: r.delete_run(key), lambda: r.submit("spectra", {"num_tokens": 64})):
                with pytest.raises(BackendError) as err:
                    call()
                assert err.value.status == 403 and "read-only" in err.value.message
            assert r.jobs() and all(j["status"] != "interrupted" for j in r.jobs())
            assert isinstance(r.generate(GENERATE)["answer"], str)     # answers, writes nothing
        finally:
            reader.stop()
        assert c.run(key)["status"] == "complete"           # the writer is untouched

        # Queue limit: one running grid, two queued, the next is refused with 429.
        big = c.submit("needle", needle(depths=41, samples=10, ratio=0.25))
        wait_until(c, big["id"], lambda j: j["status"] == "running")
        queued = [c.submit("spectra", {"num_tokens": 64 + i, "grid_points": 17, "chunks": 4})
                  for i in range(2)]
        with pytest.raises(BackendError) as err:
            c.submit("spectra", {"num_tokens": 99, "grid_points": 17, "chunks": 4})
        assert err.value.status == 429 and "the queue already holds 2 jobs" in err.value.message
        for j in [big, *queued]:
            c.cancel(j["id"])

        # No token: only requests addressed to the loopback are answered (DNS rebinding).
        assert httpx.get(first.url + "/health").status_code == 200
        evil = httpx.get(first.url + "/health", headers={"Host": "evil.example:8765"})
        assert evil.status_code == 421 and "loopback" in evil.json()["detail"]
        assert httpx.get(first.url + "/health", headers={"Host": "localhost"}).status_code == 200
    finally:
        first.stop()
    # Once the writer is gone the store is free again.
    cli = run_python("-m", "analysis", "store", "delete", key, "--out", str(tmp_path))
    assert cli.returncode == 0, cli.stderr


def test_damaged_files_at_start_up_are_skipped_or_repaired(tmp_path):
    first = start_backend(tmp_path)
    try:
        c = first.client
        done = c.wait(c.submit("spectra", {"num_tokens": 64, "grid_points": 17, "chunks": 4})["id"])
    finally:
        first.stop()
    (tmp_path / "jobs" / "0123.json").write_text("[1,2]")
    (tmp_path / "jobs" / "4567.json").write_text('{"id": "4567", "kind": "needle", "sta')
    index = tmp_path / "index.sqlite"
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"index.sqlite{suffix}").unlink(missing_ok=True)
    index.write_bytes(index.read_bytes()[:1000])                       # truncated
    second = start_backend(tmp_path)
    try:
        health = second.client.health()
        warnings = " | ".join(health["warnings"])
        assert "jobs/0123.json" in warnings and "jobs/4567.json" in warnings
        assert "rebuilt the index" in warnings and str(tmp_path) not in warnings
        assert second.client.run(done["run_key"])["status"] == "complete"
        assert [j["id"] for j in second.client.jobs()] == [done["id"]]
        cell = next((tmp_path / "runs").glob("spectra-*/cells/*.json"))
        cell.write_text(cell.read_text()[:10])               # a damaged cell: served, not a 500
        damaged = second.client.run(done["run_key"])
        assert damaged["damaged_cells"] == [cell.name] and damaged["records"] == []
        assert damaged["status"] == "incomplete" and "run the same job" in damaged["error"]
    finally:
        second.stop()
    # The CLI's reindex works on a damaged index too (no hand deletion first), and exits 1
    # over the damaged cell, naming it.
    index.write_bytes(b"garbage" * 200)
    cli = run_python("-m", "analysis", "store", "reindex", "--out", str(tmp_path))
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert "rebuilt the index" in cli.stdout and "indexed 1 run(s)" in cli.stdout
    assert "damaged cell" in cli.stdout and cell.name in cli.stdout


def _cells(store) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in (store / "runs").glob("needle-*/cells/*.json")}


KILL_POINTS = (1, 8, 20)


def test_kill_9_at_several_points_loses_no_finished_cell(tmp_path, capsys):
    """kill -9 the server after 1, 8 and 20 of 40 cells of one grid (cumulative over restarts);
    after each restart the run is interrupted (not running), resubmitting recomputes none of
    the finished cells, and the final grid verifies clean."""
    params = needle(depths=4, samples=5, ratio=0.6)            # 40 cells
    lost, job_id = [], None
    for point in KILL_POINTS:
        server = start_backend(tmp_path)
        try:
            c = server.client
            if job_id is not None:
                old = c.job(job_id)
                assert old["status"] == "interrupted"
                assert c.run(old["run_key"])["status"] == "interrupted"      # not stale
            job_id = c.submit("needle", params)["id"]
            wait_until(c, job_id, lambda j: j["progress"]["done"] >= point)
            os.kill(server.process.pid, signal.SIGKILL)
            server.process.wait(30)
        finally:
            server.stop()
        before = _cells(tmp_path)
        lost.append((point, before))
    final = start_backend(tmp_path)
    try:
        c = final.client
        again = c.wait(c.submit("needle", params)["id"], poll=0.05)
        assert again["status"] == "done", again["error"]
        run = c.run(again["run_key"])
        assert run["cells_done"] == 40 and run["status"] == "complete" and not run["damaged_cells"]
    finally:
        final.stop()
    after = _cells(tmp_path)
    assert len(after) == 40
    summary = []
    for point, before in lost:
        missing = [n for n, stamp in before.items() if after.get(n) != stamp]
        summary.append(f"killed at >= {point} cells: {len(before)} finished, {len(missing)} lost")
        assert missing == []
    assert ResultsStore(tmp_path, read_only=True).verify() == []
    with capsys.disabled():
        print("\nkill -9 resume: " + "; ".join(summary))


def failing_after_open(model, store, params, progress=None, should_stop=None, **_):
    """A job function that opens its run, then fails (as a bug after the cells would)."""
    run = store.open_run("spectra", {"failing": params.num_tokens})
    run.set_total(1)
    raise RuntimeError("metrics could not be computed")


def test_a_failed_job_marks_its_run_failed(tmp_path, monkeypatch):
    from analysis.api.params import SpectraParams
    from analysis.service import jobs as jobs_module
    from analysis.tasks import kinds

    monkeypatch.setitem(kinds(), "spectra", dataclasses.replace(
        kinds()["spectra"], run="tests.test_backend_robustness:failing_after_open"))
    queue = jobs_module.JobQueue(None, tmp_path)          # the job function needs no model
    queue.start()
    try:
        job = queue.wait(queue.submit("spectra", SpectraParams(num_tokens=64))["id"], timeout=60)
    finally:
        queue.stop()
    assert job["status"] == "failed" and "metrics could not be computed" in job["error"]
    run = ResultsStore(tmp_path).get(job["run_key"])
    assert run.status == "failed" and "metrics could not be computed" in run.error


def test_tokens_weak_refused_scheme_case_insensitive(tmp_path):
    weak = run_python(*server_args(tmp_path, "--host", "0.0.0.0", "--token", "x"))
    assert weak.returncode == 2 and "weak token" in weak.stderr and "openssl rand" in weak.stderr
    for token in ("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "password1234"):
        proc = run_python(*server_args(tmp_path, "--host", "0.0.0.0", "--token", token))
        assert proc.returncode == 2 and "weak token" in proc.stderr, token
    from analysis.service.server import token_bits

    assert token_bits("0123456789abcdef" * 2) >= 128          # openssl rand -hex 16
    token = "k" + os.urandom(16).hex()
    server = start_backend(tmp_path, token=token)
    try:
        for scheme in ("Bearer", "bearer", "BEARER"):
            ok = httpx.get(server.url + "/health", headers={"Authorization": f"{scheme} {token}"})
            assert ok.status_code == 200, scheme
        assert httpx.get(server.url + "/health",
                         headers={"Authorization": f"Basic {token}"}).status_code == 401
        # with a token, any Host is fine (the token is the protection)
        assert httpx.get(server.url + "/health", headers={
            "Authorization": f"Bearer {token}", "Host": "gpu-box:8765"}).status_code == 200
    finally:
        server.stop()
