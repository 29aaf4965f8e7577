"""The backend's client, for the app and the CLI (stdlib + httpx only: no torch here).

    client = BackendClient()                        # $FAEDKV_BACKEND_URL or http://127.0.0.1:8765
    job = client.submit("needle", {"methods": [{"name": "snapkv", "compression_ratio": 0.75}]})
    job = client.wait(job["id"], on_progress=lambda j: print(j["progress"]))
    rows = client.run(job["run_key"])["records"]

    with LocalBackend(model="tiny-random-llama", store="results") as client:   # its own server
        ...

`LocalBackend` starts `python -m analysis.service.server` in a subprocess, waits for /health and stops
it when this process exits (the app does so when FAEDKV_BACKEND_URL is unset). Every failure
is a `BackendError` carrying the server's message (its "detail") and the HTTP status.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import httpx

from analysis.api.job_states import TERMINAL

DEFAULT_URL = "http://127.0.0.1:8765"
URL_ENV = "FAEDKV_BACKEND_URL"
TOKEN_ENV = "FAEDKV_TOKEN"
_REPO = Path(__file__).resolve().parents[2]


class BackendError(RuntimeError):
    """A request to the backend failed; `status` is the HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status


def _as_dict(params: Any) -> dict:
    """A params dict, or a pydantic model from analysis.api.params as its JSON dict."""
    dump = getattr(params, "model_dump", None)
    return dump(mode="json") if callable(dump) else dict(params)


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, str):
        return detail
    return str(detail if detail is not None else body)


class BackendClient:
    """Typed calls to the REST API of `analysis.service.server` (see DEVELOPERS.md)."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0,
                 generate_timeout: float | None = 900.0,
                 transport: httpx.BaseTransport | None = None):
        self.url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        token = token or os.environ.get(TOKEN_ENV) or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = timeout
        # /generate waits for the answer on the server; it may queue behind another answer.
        self.generate_timeout = generate_timeout
        # `transport`: another way to reach the server (httpx.MockTransport in tests).
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout,
                                  transport=transport)

    def __repr__(self) -> str:
        return f"BackendClient({self.url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "BackendClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise BackendError(
                f"the backend at {self.url} is not running ({exc}). Start it with "
                "`python -m analysis.service.server` (or `make backend`), or unset "
                f"{URL_ENV} to let the app start its own.") from exc
        except httpx.TimeoutException as exc:
            raise BackendError(f"the backend at {self.url} did not answer {method} {path} in time "
                               f"({exc.__class__.__name__}); it may be overloaded, try again.") from exc
        except httpx.HTTPError as exc:
            raise BackendError(f"request to {self.url}{path} failed: {exc}") from exc
        if response.status_code >= 400:
            raise BackendError(_detail(response), response.status_code)
        return response.json()

    @staticmethod
    def _seg(value: str) -> str:
        return quote(str(value), safe="")

    # -- API --------------------------------------------------------------------------------

    def health(self) -> dict:
        return self._request("GET", "/health")

    def methods(self) -> dict:
        return self._request("GET", "/methods")

    def runs(self, kind: str | None = None, limit: int = 200) -> list[dict]:
        query = {"limit": limit} | ({"kind": kind} if kind else {})
        return self._request("GET", "/runs", params=query)

    def run(self, key: str) -> dict:
        return self._request("GET", f"/runs/{self._seg(key)}")

    def array(self, key: str, name: str) -> dict:
        """{field: nested lists}; numpy users: `np.asarray(client.array(k, n)["x"])`."""
        return self._request("GET", f"/runs/{self._seg(key)}/arrays/{self._seg(name)}")

    def delete_run(self, key: str) -> dict:
        return self._request("DELETE", f"/runs/{self._seg(key)}")

    def submit(self, kind: str, params: Any) -> dict:
        """Queue a job; returns the Job dict (status "queued")."""
        return self._request("POST", "/jobs", json={"kind": kind, "params": _as_dict(params)})

    def job(self, job_id: str) -> dict:
        return self._request("GET", f"/jobs/{self._seg(job_id)}")

    def jobs(self) -> list[dict]:
        return self._request("GET", "/jobs")

    def cancel(self, job_id: str) -> dict:
        return self._request("POST", f"/jobs/{self._seg(job_id)}/cancel")

    def wait(self, job_id: str, poll: float = 0.5,
             on_progress: Callable[[dict], None] | None = None,
             timeout: float | None = None) -> dict:
        """Poll until the job is done, failed, cancelled or interrupted; returns it.
        `on_progress(job)` is called whenever its status or progress changes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = None
        while True:
            job = self.job(job_id)
            state = (job["status"], job["progress"].get("done"), job["progress"].get("total"))
            if on_progress is not None and state != seen:
                on_progress(job)
            seen = state
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise BackendError(f"job {job_id} is still {job['status']} after {timeout:g} s "
                                   f"({job['progress']['done']}/{job['progress']['total']} cells)")
            time.sleep(poll)

    def generate(self, params: Any) -> dict:
        """One compressed generation (answer, cache sizes, reconstruction error), ahead of
        queued batch jobs."""
        return self._request("POST", "/generate", json=_as_dict(params),
                             timeout=self.generate_timeout)


# ---------------------------------------------------------------------------- local backend


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalBackend:
    """`python -m analysis.service.server` in a child process on this machine (loopback only; with
    `token`, every request must carry it).

    Started in its own process group and stopped (SIGTERM, then SIGKILL) by `stop()`, on
    `with` exit, or when this interpreter exits. Its output goes to `<store>/backend.log`."""

    def __init__(self, model: str | None = None, store: str | os.PathLike = "results",
                 device: str = "auto", dtype: str = "auto", port: int | None = None,
                 python: str | None = None, startup_timeout: float = 300.0,
                 extra_args: tuple[str, ...] = (), token: str | None = None):
        self.model = model or "smollm2-135m-instruct"
        self.store = Path(store).resolve()
        self.device, self.dtype = device, dtype
        self.port = port
        self.python = python or sys.executable
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self.token = token          # handed to the child in its environment, not its argv
        self.process: subprocess.Popen | None = None
        self.client: BackendClient | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.store / "backend.log"

    def command(self) -> list[str]:
        return [self.python, "-m", "analysis.service.server", "--model", self.model, "--port",
                str(self.port), "--store", str(self.store), "--device", self.device,
                "--dtype", self.dtype, "--host", "127.0.0.1", *self.extra_args]

    def start(self) -> BackendClient:
        """Start the server (once) and return a client once /health answers."""
        with self._lock:
            if self.process is not None and self.process.poll() is None and self.client:
                return self.client
            self.port = self.port or free_port()
            self.store.mkdir(parents=True, exist_ok=True)
            env = {k: v for k, v in os.environ.items() if k not in (URL_ENV, TOKEN_ENV)}
            if self.token:
                env[TOKEN_ENV] = self.token
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), env.get("PYTHONPATH")]))
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(self.command(), cwd=_REPO, env=env,
                                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                                start_new_session=True)
            atexit.register(self.stop)
            self.client = BackendClient(self.url, token=self.token)
            try:
                self._wait_healthy()
            except BaseException:
                self._stop_locked()
                raise
            return self.client

    def _log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise BackendError(f"the local backend exited with status {code} while starting "
                                   f"({' '.join(self.command())}); its log "
                                   f"({self.log_path}) ends with:\n{self._log_tail()}")
            with contextlib.suppress(BackendError):
                self.client.health()
                return
            time.sleep(0.25)
        raise BackendError(f"the local backend did not answer /health within "
                           f"{self.startup_timeout:g} s; see {self.log_path}")

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stop_locked(timeout)

    def _stop_locked(self, timeout: float = 10.0) -> None:
        process, self.process = self.process, None
        if self.client is not None:
            self.client.close()
            self.client = None
        if process is None or process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> BackendClient:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
