"""The backend on loopback (a real `python -m analysis.service.server` on the tiny random Llama), driven
through `analysis.api.client`: job lifecycle, progress, cancel, priority of `generate`, concurrent
clients, kill -9 and resume, token enforcement, bad requests, and a schemathesis fuzz."""
from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from analysis.api.client import BackendClient, BackendError, LocalBackend, free_port
from analysis.results.store import ResultsStore
from analysis.service import jobs as jobs_module
from analysis.tasks import kinds

TOKEN = "test-" + secrets.token_hex(16)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_CELLS = 1000
TINY = "tiny-random-llama"
REPO = Path(__file__).resolve().parent.parent


def needle(depths: int, samples: int, ratio: float = 0.5, **extra) -> dict:
    """A needle grid on 128-token contexts: 2 methods (snapkv + the added full) x depths x samples."""
    return {"methods": [{"name": "snapkv", "compression_ratio": ratio}], "lengths": [128],
            "depths": [round(100 * i / max(depths - 1, 1), 3) for i in range(depths)],
            "samples": samples, "max_new_tokens": 4, **extra}


GENERATE = {"prompt": {"kind": "needle", "context_length": 128, "seed": 3},
            "method": {"name": "snapkv", "compression_ratio": 0.5}, "max_new_tokens": 4}


def start_backend(store: Path, **kwargs) -> LocalBackend:
    backend = LocalBackend(model=TINY, store=store, device="cpu",
                           extra_args=("--import-assets", "", *kwargs.pop("extra_args", ())),
                           startup_timeout=180, **kwargs)
    backend.start()
    return backend


def wait_until(client: BackendClient, job_id: str, predicate, poll: float = 0.02) -> dict:
    """Poll the job until predicate(job) holds; fails if it finishes first."""
    while True:
        job = client.job(job_id)
        if predicate(job):
            return job
        assert job["status"] not in jobs_module.TERMINAL, f"job finished first: {job}"
        time.sleep(poll)


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    """One server for the module; it requires the token on every request."""
    store = tmp_path_factory.mktemp("store")
    local = start_backend(store, token=TOKEN, extra_args=("--max-cells", str(MAX_CELLS)))
    yield local
    local.stop()


@pytest.fixture
def client(backend):
    with BackendClient(backend.url, token=TOKEN) as c:
        yield c


# --------------------------------------------------------------------------------- lifecycle


def test_health_methods_and_openapi(client, backend):
    health = client.health()
    assert health["status"] == "ok"
    assert health["model"]["name"] == TINY and health["model"]["num_layers"] == 3
    assert set(health["queue"]) == {"queued", "running"}
    methods = client.methods()
    assert "faedkv" in methods["methods"] and "iwdft" in methods["variants"]
    assert methods["job_kinds"]["needle"] is True and methods["job_kinds"]["generate"] is True
    schema = httpx.get(backend.url + "/openapi.json", headers=AUTH).json()
    for path in ("/health", "/methods", "/runs", "/runs/{key}", "/runs/{key}/arrays/{name}",
                 "/jobs", "/jobs/{job_id}", "/jobs/{job_id}/cancel", "/generate"):
        assert path in schema["paths"], path
    assert "GenerateParams" in schema["components"]["schemas"]


def test_job_lifecycle_progress_and_results(client):
    job = client.submit("needle", needle(depths=3, samples=2))
    assert job["status"] == "queued" and job["progress"] == {"done": 0, "total": 0}
    seen = []
    final = client.wait(job["id"], poll=0.02, on_progress=lambda j: seen.append(
        (j["status"], j["progress"]["done"], j["progress"]["total"])))
    assert final["status"] == "done", final["error"]
    assert final["error"] is None and final["started"] and final["finished"]
    assert final["progress"] == {"done": 12, "total": 12}
    dones = [d for _, d, _ in seen]
    assert dones == sorted(dones) and dones[-1] == 12
    assert seen[-1][0] == "done"
    run = client.run(final["run_key"])
    assert run["kind"] == "needle" and run["status"] == "complete"
    assert run["cells_done"] == run["cells_total"] == 12 and len(run["records"]) == 12
    assert {r["method"] for r in run["records"]} == {"full", "snapkv"}
    assert run["metrics"] is not None
    assert final["run_key"] in [r["key"] for r in client.runs(kind="needle")]
    assert final["id"] in [j["id"] for j in client.jobs()]
    # The same job again is the same run: nothing is recomputed, the job is done at once.
    again = client.wait(client.submit("needle", needle(depths=3, samples=2))["id"], poll=0.02)
    assert again["run_key"] == final["run_key"] and again["progress"]["done"] == 12
    assert client.run(final["run_key"])["records"] == run["records"]


OTHER_KINDS = {
    "suite": ({"methods": [{"name": "knorm", "compression_ratio": 0.5}], "samples": 1,
               "tasks": ["variable_tracking"], "context_length": 256, "max_new_tokens": 4}, 2),
    "ppl": ({"methods": [{"name": "knorm", "compression_ratio": 0.5}], "prefix_tokens": 64,
             "continuation_tokens": 8, "num_texts": 1}, 2),
    "ablate": ({"chunks": 2, "layers": [0], "prefix_tokens": 64, "continuation_tokens": 8,
                "num_texts": 1, "needle_samples": 0, "window": 8, "sink_tokens": 2}, 3),
    "contrib": ({"methods": [{"name": "faedkv", "compression_ratio": 0.5}],
                 "context_length": 128}, 1),
}


@pytest.mark.parametrize("kind", list(OTHER_KINDS))
def test_every_batch_kind_runs_through_the_server(client, kind):
    params, cells = OTHER_KINDS[kind]
    job = client.wait(client.submit(kind, params)["id"], poll=0.05)
    assert job["status"] == "done", job["error"]
    assert job["progress"] == {"done": cells, "total": cells}
    run = client.run(job["run_key"])
    assert run["kind"] == kind and run["cells_done"] == cells
    assert len(run["records"]) == cells and run["status"] == "complete"


def test_arrays_and_delete(client):
    job = client.wait(client.submit("spectra", {"num_tokens": 64, "grid_points": 17,
                                                "chunks": 4})["id"])
    assert job["status"] == "done", job["error"]
    run = client.run(job["run_key"])
    assert run["arrays"], run
    arrays = client.array(job["run_key"], run["arrays"][0])
    assert arrays and all(isinstance(v, list) for v in arrays.values())
    with pytest.raises(BackendError) as err:
        client.array(job["run_key"], "no_such_array")
    assert err.value.status == 404 and "no array 'no_such_array'" in err.value.message
    assert client.delete_run(job["run_key"]) == {"deleted": job["run_key"]}
    with pytest.raises(BackendError) as err:
        client.run(job["run_key"])
    assert err.value.status == 404 and "no run" in err.value.message


def test_cancel_keeps_finished_cells_and_cancels_queued_jobs(client):
    big = client.submit("needle", needle(depths=41, samples=10, ratio=0.25))   # 820 cells
    queued = client.submit("needle", needle(depths=41, samples=10, ratio=0.3))
    running = wait_until(client, big["id"], lambda j: j["progress"]["done"] >= 3)
    assert running["status"] == "running" and running["progress"]["total"] == 820
    assert running["run_key"]              # known while it runs: partial results are readable
    with pytest.raises(BackendError) as err:
        client.delete_run(running["run_key"])
    assert err.value.status == 409 and "cancel that job first" in err.value.message
    health = client.health()             # answers while the worker is busy with the grid
    assert health["queue"] == {"queued": 1, "running": big["id"]}
    assert client.cancel(queued["id"])["status"] == "cancelled"
    client.cancel(big["id"])
    final = client.wait(big["id"], poll=0.05)
    assert final["status"] == "cancelled" and "stopped after" in final["error"]
    done = final["progress"]["done"]
    assert 3 <= done < 820
    run = client.run(final["run_key"])
    assert run["status"] == "cancelled" and run["cells_done"] == done == len(run["records"])
    never = client.job(queued["id"])
    assert never["status"] == "cancelled" and never["started"] is None and never["run_key"] is None


def test_generate_goes_ahead_of_a_running_batch_job(client):
    big = client.submit("needle", needle(depths=41, samples=10, ratio=0.35))   # 820 cells
    wait_until(client, big["id"], lambda j: j["progress"]["done"] >= 1)
    result = client.generate(GENERATE)
    # The answer came back between two cells of the batch job, which is still running.
    batch = client.job(big["id"])
    assert batch["status"] == "running" and batch["progress"]["done"] < 820
    assert result["method_label"] == "snapkv@0.5" and isinstance(result["answer"], str)
    assert len(result["cache_lengths"]) == 3
    client.cancel(big["id"])
    assert client.wait(big["id"], poll=0.05)["status"] == "cancelled"


def test_concurrent_clients(backend):
    results, errors = {}, []

    def session(i: int) -> None:
        try:
            with BackendClient(backend.url, token=TOKEN) as c:
                answer = c.generate(GENERATE)
                job = c.submit("needle", needle(depths=2, samples=1, ratio=0.1 * (i + 1)))
                c.health()
                job = c.wait(job["id"], poll=0.05)
                results[i] = (answer, job)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=session, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert len(results) == 4
    answers = {r[0]["answer"] for r in results.values()}
    assert len(answers) == 1        # one model, same request: the same answer for everyone
    keys = {r[1]["run_key"] for r in results.values()}
    assert all(r[1]["status"] == "done" for r in results.values()) and len(keys) == 4


# ------------------------------------------------------------------------------ bad requests


BAD = [
    ("POST", "/jobs", {"kind": "needle", "params": {"methods": [{"name": "nope"}]}},
     422, "unknown method 'nope'"),
    ("POST", "/jobs", {"kind": "bogus", "params": {}}, 422, "unknown job kind 'bogus'"),
    ("POST", "/jobs", {"kind": "needle", "params": needle(depths=41, samples=20)},
     422, f"1640 cells, more than this server's limit of {MAX_CELLS}"),
    ("POST", "/jobs", {"kind": "needle", "params": {**needle(2, 1), "lengths": [9000]}},
     422, "exceeds the model context of 8192"),
    ("POST", "/jobs", {"kind": "needle", "params": {**needle(2, 1), "colour": "red"}},
     422, "params.colour: Extra inputs are not permitted"),
    ("POST", "/jobs", {"params": {}}, 422, "kind: Field required"),
    ("POST", "/jobs", {"kind": "ablate", "params": {"layers": [0, 7], "chunks": 2}},
     422, "params.layers [7] outside [0, 2]"),
    ("POST", "/generate", {**GENERATE, "prompt": {"kind": "text", "text": "word " * 9000,
                                                  "question": "Which word?"}},
     422, "exceeds the model context of 8192"),
    ("POST", "/generate", {**GENERATE, "method": {"name": "zip"}}, 422, "unknown method 'zip'"),
    ("GET", "/runs/0123456789abcdef", None, 404, "no run '0123456789abcdef'"),
    ("GET", "/runs/a.b", None, 422, "run key 'a.b' is malformed"),
    ("DELETE", "/runs/0123456789abcdef", None, 404, "no run"),
    ("GET", "/jobs/" + "0" * 32, None, 404, "no job"),
    ("POST", "/jobs/nope/cancel", None, 404, "no job 'nope'"),
    ("GET", "/runs?limit=0", None, 422, "limit"),
]


@pytest.mark.parametrize("method,path,body,status,message", BAD,
                         ids=[f"{m} {p} {s}" for m, p, _, s, _ in BAD])
def test_bad_requests(backend, method, path, body, status, message):
    response = httpx.request(method, backend.url + path, json=body, headers=AUTH, timeout=60)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


def test_malformed_json(backend):
    response = httpx.post(backend.url + "/jobs", content=b'{"kind": "needle",',
                          headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["detail"]


def test_unimportable_job_kind_is_unavailable(monkeypatch):
    needle = kinds()["needle"]
    monkeypatch.setitem(kinds(), "needle", dataclasses.replace(needle, run="analysis.no_such_module:run"))
    with pytest.raises(jobs_module.JobUnavailable, match="analysis.no_such_module cannot be imported"):
        jobs_module.job_function("needle")
    assert jobs_module.availability()["needle"] is not None
    monkeypatch.setitem(kinds(), "needle", dataclasses.replace(needle, run="analysis.api.params:run_nothing"))
    with pytest.raises(jobs_module.JobUnavailable, match="has no function run_nothing"):
        jobs_module.job_function("needle")


# ------------------------------------------------------------------------------------ token


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": TOKEN}], ids=["missing", "wrong", "no-bearer"])
def test_token_required(backend, headers):
    for path in ("/health", "/runs", "/openapi.json"):
        response = httpx.get(backend.url + path, headers=headers)
        assert response.status_code == 401, path
        assert "token" in response.json()["detail"]
    with BackendClient(backend.url, token="wrong") as bad:
        with pytest.raises(BackendError) as err:
            bad.jobs()
    assert err.value.status == 401
    assert httpx.get(backend.url + "/health", headers=AUTH).status_code == 200


def test_public_bind_without_token_refuses_to_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FAEDKV_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "analysis.service.server", "--model", TINY, "--host",
                           "0.0.0.0", "--port", str(free_port()), "--store", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "refusing to listen on '0.0.0.0' without a token" in proc.stderr
    assert not (tmp_path / "jobs").exists()          # it stopped before touching the store


# ----------------------------------------------------------------------- kill -9 and resume


def _cell_files(store: Path) -> dict[str, tuple[int, int]]:
    """cell file -> (inode, mtime_ns): a rewritten cell gets a new inode (atomic rename)."""
    out = {}
    for path in (store / "runs").glob("needle-*/cells/*.json"):
        stat = path.stat()
        out[path.name] = (stat.st_ino, stat.st_mtime_ns)
    return out


def test_kill_9_then_resume_recomputes_no_finished_cell(tmp_path):
    params = needle(depths=8, samples=5, ratio=0.6)         # 80 cells
    first = start_backend(tmp_path)
    try:
        job = first.client.submit("needle", params)
        wait_until(first.client, job["id"], lambda j: j["progress"]["done"] >= 5)
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait(30)
    finally:
        first.stop()
    before = _cell_files(tmp_path)
    assert 5 <= len(before) < 80

    shipped = ResultsStore(tmp_path.parent / f"{tmp_path.name}-shipped")
    asset = shipped.open_run("spectra", {"shipped": True})
    asset.put("text", {"essay": "x"})
    asset.write_metrics({"answer": 42})
    second = start_backend(tmp_path, extra_args=("--import-assets", str(shipped.root)))
    try:
        c = second.client
        imported = c.run(asset.key)           # shipped runs are served after start-up
        assert imported["metrics"] == {"answer": 42} and imported["records"][0]["essay"] == "x"
        old = c.job(job["id"])               # the job list survived the crash
        assert old["status"] == "interrupted" and "submit the same job again" in old["error"]
        assert old["run_key"]
        assert c.run(old["run_key"])["cells_done"] == len(before)
        again = c.wait(c.submit("needle", params)["id"], poll=0.05)
        assert again["status"] == "done", again["error"]
        assert again["run_key"] == old["run_key"]
        run = c.run(again["run_key"])
        assert run["cells_done"] == 80 and run["status"] == "complete"
    finally:
        second.stop()
    assert second.process is None
    after = _cell_files(tmp_path)
    assert len(after) == 80
    unchanged = [name for name, stamp in before.items() if after.get(name) == stamp]
    assert len(unchanged) == len(before)          # no finished cell was computed again
    assert len(set(after) - set(before)) == 80 - len(before)


# -------------------------------------------------------------------------------- fuzzing


def test_fuzz_no_server_errors(backend):
    """A few schema-generated requests per operation (valid and invalid): never a 5xx.
    (schemathesis' pytest fixture loader does not run under pytest 9, so hypothesis drives
    each operation's strategy directly.)"""
    schema = schemathesis.openapi.from_url(backend.url + "/openapi.json", headers=AUTH)
    # Job submission and generation run the model: covered above, not fuzzed.
    schema = schema.exclude(path="/generate").exclude(method="POST", path="/jobs")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert "GET /jobs/{job_id}" in labels and "DELETE /runs/{key}" in labels
    assert "POST /jobs" not in labels and len(labels) == 9
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=5, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate(base_url=backend.url, headers=AUTH,
                                   checks=[not_a_server_error])

        check()
