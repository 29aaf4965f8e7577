"""analysis.api.client: errors carry the server's message, wait() reports progress, the module stays
torch-free, and LocalBackend starts and stops a real server process (tiny random Llama)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from analysis.api.client import BackendClient, BackendError, LocalBackend, free_port
from analysis.api.params import GenerateParams, MethodSpec

REPO = Path(__file__).resolve().parent.parent


def mock_client(handler, **kwargs) -> BackendClient:
    return BackendClient("http://backend.test", transport=httpx.MockTransport(handler), **kwargs)


def test_client_module_does_not_import_torch():
    code = ("import sys, analysis.api.client; "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[]"


def test_connection_refused_says_how_to_start_the_backend():
    c = BackendClient(f"http://127.0.0.1:{free_port()}", timeout=5)
    with pytest.raises(BackendError) as err:
        c.health()
    assert err.value.status is None
    assert "is not running" in err.value.message
    assert "python -m analysis.service.server" in err.value.message


def test_errors_carry_the_servers_detail_and_status():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/runs/abc":
            return httpx.Response(404, json={"detail": "no run 'abc' in the store"})
        return httpx.Response(500, text="proxy exploded")

    c = mock_client(handler)
    with pytest.raises(BackendError) as err:
        c.run("abc")
    assert (err.value.status, err.value.message) == (404, "no run 'abc' in the store")
    with pytest.raises(BackendError) as err:
        c.jobs()
    assert (err.value.status, err.value.message) == (500, "proxy exploded")


def test_requests_carry_token_params_and_quoted_paths():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True})

    c = mock_client(handler, token="s3cret")
    params = GenerateParams(method=MethodSpec(name="snapkv", compression_ratio=0.5))
    c.generate(params)                               # a pydantic model is sent as its JSON
    c.submit("needle", {"methods": [{"name": "full"}]})
    c.array("k/../x", "a b")
    c.runs(kind="needle", limit=5)
    assert all(r.headers["authorization"] == "Bearer s3cret" for r in seen)
    assert json.loads(seen[0].content) == params.model_dump(mode="json")
    assert json.loads(seen[1].content) == {"kind": "needle", "params": {"methods": [{"name": "full"}]}}
    assert seen[2].url.raw_path == b"/runs/k%2F..%2Fx/arrays/a%20b"
    assert dict(seen[3].url.params) == {"kind": "needle", "limit": "5"}


def test_wait_reports_each_change_and_returns_the_finished_job():
    states = [("queued", 0, 0), ("running", 1, 3), ("running", 1, 3), ("running", 3, 3),
              ("done", 3, 3)]

    def handler(request: httpx.Request) -> httpx.Response:
        status, done, total = states.pop(0) if len(states) > 1 else states[0]
        return httpx.Response(200, json={"id": "j", "status": status,
                                         "progress": {"done": done, "total": total}})

    seen = []
    job = mock_client(handler).wait("j", poll=0, on_progress=lambda j: seen.append(
        (j["status"], j["progress"]["done"])))
    assert job["status"] == "done"
    assert seen == [("queued", 0), ("running", 1), ("running", 3), ("done", 3)]


def test_wait_timeout_names_the_job_state():
    def handler(request):
        return httpx.Response(200, json={"id": "j", "status": "running",
                                         "progress": {"done": 2, "total": 9}})

    with pytest.raises(BackendError, match=r"job j is still running after 0.05 s \(2/9 cells\)"):
        mock_client(handler).wait("j", poll=0.01, timeout=0.05)


def test_client_uses_the_configured_url(monkeypatch):
    monkeypatch.setenv("FAEDKV_BACKEND_URL", "http://gpu-box:9000/")
    assert BackendClient().url == "http://gpu-box:9000"


def test_local_backend_reports_a_server_that_cannot_start(tmp_path):
    local = LocalBackend(model=str(tmp_path / "no-such-model"), store=tmp_path / "store",
                         device="cpu", startup_timeout=120)
    with pytest.raises(BackendError) as err:
        local.start()
    assert "exited with status 2" in err.value.message
    assert "does not exist" in err.value.message             # the server's own one-line reason
    assert local.process is None


def test_local_backend_serves_then_stops_with_its_parent(tmp_path):
    """A process that starts a LocalBackend and exits normally leaves no server behind."""
    script = textwrap.dedent(f"""
        from analysis.api.client import LocalBackend
        local = LocalBackend(model="tiny-random-llama", store={str(tmp_path)!r}, device="cpu",
                             extra_args=("--import-assets", ""), startup_timeout=180)
        client = local.start()
        health = client.health()
        print(local.process.pid, local.url, health["model"]["name"], flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    pid, url, model = out.stdout.split()
    assert model == "tiny-random-llama"
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid), 0)
    with pytest.raises(BackendError, match="is not running"):
        BackendClient(url, timeout=5).health()
    assert "FAEDKV backend: tiny-random-llama" in (tmp_path / "backend.log").read_text()
