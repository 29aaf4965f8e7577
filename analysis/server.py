"""The backend: one process loads the model once and runs jobs for any number of clients.

    python -m analysis.server --model smollm2-135m-instruct --device cuda --port 8765 --store results/

REST API (the contract is in DEVELOPERS.md, "Backend REST API"): health and model info, the
results store (list, fetch, delete), jobs (needle, suite, ppl, spectra, ablate, contrib: a
grid of cells with progress and cancel) and `POST /generate` (one answer, ahead of batch jobs).
The model lives on one worker thread (`analysis.jobs.JobQueue`); the HTTP handlers never touch
it, so /health answers while an ablation runs.

Security: the server binds to 127.0.0.1 by default. Binding anywhere else needs a token
(`--token` or FAEDKV_TOKEN) that every request carries as `Authorization: Bearer <token>`, or
the server refuses to start. Every request body is a pydantic model from `analysis.params`,
bounded by the loaded model's context and `--max-cells`; no endpoint takes a file path.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hmac
import logging
import os
import re
import sys
from pathlib import Path

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from analysis import params as P
from analysis.jobs import JobQueue, JobUnavailable, UnknownJob, availability
from analysis.store import ResultsStore, StoreError, json_safe, project_commit

log = logging.getLogger("analysis.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_REPO = Path(__file__).resolve().parent.parent
DEFAULT_ASSETS = _REPO / "assets" / "results"
_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ARRAY = re.compile(r"[A-Za-z0-9_=-][A-Za-z0-9_.=-]{0,119}")
_JOB_ID = re.compile(r"[0-9a-f]{32}")
# Methods that every task grid adds when absent (analysis.tasks.with_full).
_GRIDS_WITH_FULL = ("needle", "suite", "ppl")


class JobRequest(BaseModel):
    """POST /jobs body: the job kind and its parameters (validated by `params.JOB_PARAMS[kind]`)."""
    model_config = ConfigDict(extra="forbid")
    kind: str = Field(description="one of: " + ", ".join(P.JOB_PARAMS))
    params: dict = Field(default_factory=dict)


# ------------------------------------------------------------------------------ validation


def describe_errors(errors: list[dict], prefix: str = "") -> str:
    """pydantic errors as one line: "params.methods.0.name: unknown method 'x'; known: ..."."""
    parts = []
    for err in errors:
        raw_loc = tuple(err.get("loc", ()))
        loc = [str(x) for x in raw_loc if x != "body"]
        where = ".".join(([prefix] if prefix else []) + loc)
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if raw_loc == ("body",):
            where = "the request body"
            if err.get("type") in ("model_attributes_type", "dict_type", "missing"):
                msg += " (send a JSON object with Content-Type: application/json)"
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid request"


def parse_params(kind: str, raw: dict) -> P.Strict:
    """`raw` as the kind's parameter model; ValueError naming the kind or the bad fields."""
    if kind not in P.JOB_PARAMS:
        raise ValueError(f"unknown job kind {kind!r}; known: {', '.join(P.JOB_PARAMS)}")
    try:
        return P.JOB_PARAMS[kind].model_validate(raw)
    except ValidationError as exc:
        raise ValueError(describe_errors(exc.errors(include_url=False), "params")) from exc


def grid_cells(kind: str, params: P.Strict, num_layers: int) -> int:
    """How many cells the job computes (the full-cache baseline included where tasks add it)."""
    if kind == "generate":
        return 1
    if kind == "ablate":
        return params.num_cells(num_layers)
    if kind in _GRIDS_WITH_FULL and not any(m.name == "full" for m in params.methods):
        params = params.model_copy(update={"methods": [P.MethodSpec(name="full"), *params.methods]})
    return params.num_cells()


def prompt_tokens(kind: str, params: P.Strict, tokenizer) -> tuple[int, str]:
    """(tokens the job puts in the model's context at once, what they are)."""
    if kind == "generate":
        prompt = params.prompt
        if prompt.kind == "text":
            text = prompt.text + ("\n" + prompt.question if prompt.question else "")
            n = len(tokenizer(text, add_special_tokens=True)["input_ids"])
            what = f"the prompt ({n} tokens)"
        else:
            n, what = prompt.context_length, f"prompt.context_length ({prompt.context_length})"
        return n + params.max_new_tokens, f"{what} + max_new_tokens ({params.max_new_tokens})"
    if kind == "needle":
        n = max(params.lengths)
        return n + params.max_new_tokens, (f"the longest of lengths ({n}) + max_new_tokens "
                                           f"({params.max_new_tokens})")
    if kind == "suite":
        return (params.context_length + params.max_new_tokens,
                f"context_length ({params.context_length}) + max_new_tokens ({params.max_new_tokens})")
    if kind in ("ppl", "ablate"):
        return (params.prefix_tokens + params.continuation_tokens,
                f"prefix_tokens ({params.prefix_tokens}) + continuation_tokens "
                f"({params.continuation_tokens})")
    if kind == "spectra":
        return params.num_tokens, f"num_tokens ({params.num_tokens})"
    return params.context_length, f"context_length ({params.context_length})"


def check_bounds(kind: str, params: P.Strict, info, tokenizer, max_cells: int) -> None:
    """ValueError unless the job fits the loaded model's context and the server's cell limit."""
    n, what = prompt_tokens(kind, params, tokenizer)
    if n > info.context_length:
        raise ValueError(f"{what} = {n} tokens exceeds the model context of {info.context_length} "
                         f"tokens ({info.name}); shorten the prompt or lower the lengths.")
    if kind == "ablate" and params.layers is not None:
        bad = [layer for layer in params.layers if not 0 <= layer < info.num_layers]
        if bad:
            raise ValueError(f"params.layers {bad} outside [0, {info.num_layers - 1}] "
                             f"({info.name} has {info.num_layers} layers).")
    cells = grid_cells(kind, params, info.num_layers)
    if cells > max_cells:
        raise ValueError(f"the job has {cells} cells, more than this server's limit of "
                         f"{max_cells} (--max-cells); split it into smaller grids.")


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token."""
    if host not in LOOPBACK and not token:
        raise ValueError(f"refusing to listen on {host!r} without a token: anyone who can reach "
                         "it could run jobs and delete results. Set FAEDKV_TOKEN (or pass "
                         "--token) to a long random secret, or bind to 127.0.0.1.")


def _check_key(key: str) -> str:
    if not _KEY.fullmatch(key):
        raise HTTPException(422, f"run key {key!r} is malformed: use the 16-hex-digit key (or "
                                 "<kind>-<key>) that GET /runs lists.")
    return key


def _check_job_id(job_id: str) -> str:
    if not _JOB_ID.fullmatch(job_id):
        raise HTTPException(404, f"no job {job_id!r} (job ids are 32 hex digits); list the "
                                 "jobs with GET /jobs.")
    return job_id


# ---------------------------------------------------------------------------------- the app


def create_app(loaded, store_root: str | os.PathLike, *, token: str | None = None,
               max_cells: int = P.MAX_GRID_CELLS, import_assets: str | os.PathLike | None = None,
               executor: str = "local", ray_address: str | None = None) -> FastAPI:
    """The FastAPI app serving `loaded` (a LoadedModel) and the store at `store_root`."""
    store = ResultsStore(store_root)
    if import_assets is not None and Path(import_assets).is_dir():
        try:
            copied = store.import_runs(import_assets)
            if copied:
                log.info("imported %d shipped runs from %s", copied, import_assets)
        except StoreError as exc:
            log.warning("shipped runs in %s not imported: %s", import_assets, exc)
    queue = JobQueue(loaded, store_root, executor=executor, ray_address=ray_address)
    # The worker thread may tokenize while a request validates a prompt: a fast tokenizer is
    # not safe to share across threads, so the request side has its own copy.
    tokenizer = copy.deepcopy(loaded.tokenizer)
    info = loaded.info

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        queue.start()
        yield
        queue.stop()

    app = FastAPI(title="FAEDKV Lab backend", version="1", lifespan=lifespan,
                  description=__doc__.split("\n\n")[2])
    app.state.queue, app.state.store = queue, store

    if token:
        expected = f"Bearer {token}".encode()

        @app.middleware("http")
        async def require_token(request: Request, call_next):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return JSONResponse(status_code=401, content={
                    "detail": "missing or wrong token: send 'Authorization: Bearer <token>' with "
                              "the server's token (its --token or FAEDKV_TOKEN)."})
            return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(status_code=400, content={
                "detail": "the request body is not valid JSON (" + describe_errors(errors)
                          + "); send a JSON object with Content-Type: application/json."})
        return JSONResponse(status_code=422, content={"detail": describe_errors(errors)})

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse(status_code=500, content={
            "detail": f"internal error ({exc.__class__.__name__}: {exc}); see the server log."})

    def validated(kind: str, raw: dict) -> P.Strict:
        try:
            params = parse_params(kind, raw)
            check_bounds(kind, params, info, tokenizer, max_cells)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc
        return params

    def submit(kind: str, params: P.Strict) -> dict:
        try:
            return queue.submit(kind, params)
        except JobUnavailable as exc:
            raise HTTPException(501, str(exc)) from exc

    def find_run(key: str):
        _check_key(key)
        try:
            return store.get(key)
        except StoreError as exc:
            if any(store.runs_dir.glob(f"*-{key}")) or (store.runs_dir / key).is_dir():
                raise HTTPException(500, str(exc)) from exc
            raise HTTPException(404, f"no run {key!r} in the store; list the runs with "
                                     "GET /runs.") from exc

    def summary(run) -> dict:
        for row in store.runs(kind=run.kind, limit=1_000_000):
            if row["key"] == run.key:
                return row
        return {"key": run.key, "kind": run.kind, "status": run.status, "error": run.error,
                "created": run.created, "updated": run.created, "cells_done": len(run.done()),
                "cells_total": run.cells_total, "config": run.config, "metrics": run.metrics()}

    @app.get("/health", summary="Liveness, the loaded model and the queue")
    def health() -> dict:
        return {"status": "ok", "model": info.to_dict(), "commit": project_commit(),
                "queue": queue.summary(), "max_cells": max_cells}

    @app.get("/methods", summary="Method names and options the server accepts")
    def methods() -> dict:
        return {"methods": list(P.METHODS), "variants": list(P.VARIANTS),
                "key_spaces": list(P.KEY_SPACES), "suite_tasks": list(P.SUITE_TASKS),
                "query_modes": list(P.QUERY_MODES), "needle_kinds": list(P.NEEDLE_KINDS),
                "job_kinds": {kind: why is None for kind, why in availability().items()}}

    @app.get("/runs", summary="Runs in the store, newest first")
    def runs(kind: str | None = Query(None, pattern=r"^[A-Za-z0-9_]+$", max_length=64),
             limit: int = Query(200, ge=1, le=10_000)) -> list[dict]:
        return store.runs(kind=kind, limit=limit)

    @app.get("/runs/{key}", summary="One run with its cell records")
    def run(key: str) -> dict:
        found = find_run(key)
        try:
            return {**summary(found), "records": found.records(), "arrays": found.array_names()}
        except StoreError as exc:
            raise HTTPException(500, str(exc)) from exc

    @app.get("/runs/{key}/arrays/{name}", summary="A stored array file as nested lists")
    def array(key: str, name: str) -> dict:
        found = find_run(key)
        if not _ARRAY.fullmatch(name) or name not in found.array_names():
            raise HTTPException(404, f"run {key!r} has no array {name!r} (has: "
                                     f"{', '.join(found.array_names()) or 'none'}).")
        try:
            return json_safe(found.get_array(name))
        except StoreError as exc:
            raise HTTPException(500, str(exc)) from exc

    @app.delete("/runs/{key}", summary="Delete a run")
    def delete_run(key: str) -> dict:
        found = find_run(key)
        if found.key in queue.active_run_keys():
            raise HTTPException(409, f"run {key!r} is being written by a queued or running job; "
                                     "cancel that job first (POST /jobs/{id}/cancel).")
        store.delete(found.key)
        return {"deleted": key}

    @app.post("/jobs", status_code=202, summary="Queue a job")
    def create_job(request: JobRequest) -> dict:
        return submit(request.kind, validated(request.kind, request.params))

    @app.get("/jobs", summary="Every job, newest first")
    def jobs() -> list[dict]:
        return queue.list()

    @app.get("/jobs/{job_id}", summary="One job")
    def job(job_id: str) -> dict:
        try:
            return queue.get(_check_job_id(job_id))
        except UnknownJob as exc:
            raise HTTPException(404, str(exc)) from exc

    @app.post("/jobs/{job_id}/cancel", summary="Cancel a job (finished cells are kept)")
    def cancel(job_id: str) -> dict:
        try:
            return queue.cancel(_check_job_id(job_id))
        except UnknownJob as exc:
            raise HTTPException(404, str(exc)) from exc

    @app.post("/generate", summary="One compressed generation, ahead of queued batch jobs")
    def generate(params: P.GenerateParams) -> dict:
        try:
            check_bounds("generate", params, info, tokenizer, max_cells)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc
        done = queue.wait(submit("generate", params)["id"])
        if done["status"] == "done":
            return done["result"]
        status = 422 if queue.input_error(done["id"]) else 500
        if done["status"] != "failed":
            status = 409
        raise HTTPException(status, f"generation {done['status']}: {done['error']}")

    return app


# ------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis.server", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="smollm2-135m-instruct (default, embedded), tiny-random-llama, random-llama3-8b, a HF id or a folder")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16) | float32 | bfloat16 | float16")
    p.add_argument("--attn-implementation", default=None, help="sdpa (default) | eager")
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--store", default="results", help="results store folder (default results/)")
    p.add_argument("--token", default=None, help="bearer token (default: $FAEDKV_TOKEN)")
    p.add_argument("--max-cells", type=int, default=P.MAX_GRID_CELLS,
                   help=f"largest grid a job may ask for (default {P.MAX_GRID_CELLS})")
    p.add_argument("--import-assets", default=str(DEFAULT_ASSETS),
                   help="import the finished runs shipped in this folder at start (if it exists; "
                        "'' imports nothing)")
    p.add_argument("--executor", default="local", choices=("local", "ray"))
    p.add_argument("--ray-address", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = args.token or os.environ.get("FAEDKV_TOKEN") or None
    try:
        check_bind(args.host, token)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.max_cells < 1:
        print("error: --max-cells must be at least 1", file=sys.stderr)
        return 2

    from analysis.models import ModelLoadError, load_model

    try:
        loaded = load_model(args.model, device=args.device, dtype=args.dtype,
                            attn_implementation=args.attn_implementation)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    app = create_app(loaded, args.store, token=token, max_cells=args.max_cells,
                     import_assets=args.import_assets or None, executor=args.executor,
                     ray_address=args.ray_address)
    info = loaded.info
    print(f"FAEDKV backend: {info.name} ({info.dtype}, {info.device}), store {args.store}, "
          f"http://{args.host}:{args.port}" + (" (token required)" if token else ""), flush=True)
    # A /generate request waits for its job: give open requests 5 s at shutdown, after which
    # the queue's stop() marks what is left "interrupted" and wakes them.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
