"""The backend: one process loads the model once and runs jobs for any number of clients.

    python -m analysis.service.server --model smollm2-135m-instruct --device cuda --port 8765 --store results/

REST API (the contract is in DEVELOPERS.md, "Backend REST API"): health and model info, the
results store (list, fetch, delete), jobs (needle, suite, ppl, spectra, ablate, contrib: a
grid of cells with progress and cancel) and `POST /generate` (one answer, ahead of batch jobs).
The model lives on one worker thread (`analysis.service.jobs.JobQueue`); the HTTP handlers never touch
it, so /health answers while an ablation runs.

Security: the server binds to 127.0.0.1 by default. Binding anywhere else needs a token
(`--token` or FAEDKV_TOKEN, at least 16 random bytes, e.g. `openssl rand -hex 16`) that every
request carries as `Authorization: Bearer <token>`, or the server refuses to start. Without a
token the server answers only requests whose Host header names the loopback (a web page on
another site cannot reach it through DNS rebinding). Every request body is a pydantic model
from `analysis.api.params`, checked against the loaded model (context, layers, heads, method
budgets) and `--max-cells` before it is queued; no endpoint takes a file path, and error
messages never show server paths.

One writer per store: the server holds the store's lock for its whole life; a second server on
the same store exits with a message, unless started with `--read-only` (it then serves the
store and /generate, and refuses jobs and deletes).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hmac
import json
import logging
import math
import os
import re
import sys
from pathlib import Path

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from analysis.api import params as P
from analysis.results.store import (INCOMPLETE_RUN, ResultsStore, StoreError, json_safe, lock_holder,
                                    locked_message, project_commit)
from analysis.service.jobs import (MAX_QUEUED, JobQueue, JobUnavailable, QueueFull, UnknownJob,
                                   availability, job_kind)
from analysis.tasks import JobKind, kinds

log = logging.getLogger("analysis.service.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_REPO = Path(__file__).resolve().parents[2]
DEFAULT_ASSETS = _REPO / "assets" / "results"
# A run key: 16 hex digits, or "<kind>-<16 hex digits>" (kind at most 64 characters).
_KEY = re.compile(r"(?:[A-Za-z0-9_]{1,64}-)?[0-9a-f]{16}")
MIN_TOKEN_BITS = 128
_ARRAY = re.compile(r"[A-Za-z0-9_=-][A-Za-z0-9_.=-]{0,119}")
_JOB_ID = re.compile(r"[0-9a-f]{32}")


class JobRequest(BaseModel):
    """POST /jobs body: the job kind and its parameters (validated by the kind's params model,
    `analysis.tasks.kinds()[kind].params`)."""
    model_config = ConfigDict(extra="forbid")
    kind: str = Field(description="one of: " + ", ".join(kinds()))
    params: dict = Field(default_factory=dict)


# ------------------------------------------------------------------------------ validation


# What to send instead, after pydantic's message for these error types (nothing is coerced).
_TYPE_FIXES = {
    "int_type": " (got {given}: send a whole JSON number, not a string or a float)",
    "int_from_float": " (got {given}: send a whole JSON number)",
    "int_parsing": " (got {given}: send a whole number)",
    "float_type": " (got {given}: send a JSON number, not a string)",
    "bool_type": " (got {given}: send true or false)",
    "string_type": " (got {given}: send a JSON string)",
    "list_type": " (got {given}: send a JSON list)",
    "dict_type": " (got {given}: send a JSON object)",
    "extra_forbidden": " (remove it; GET /openapi.json lists the fields)",
}


def _given(value) -> str:
    """The offending value as the client wrote it (JSON), cut short."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def describe_errors(errors: list[dict], prefix: str = "") -> str:
    """pydantic errors as one line: "params.methods.0.name: unknown method 'x'; known: ..."."""
    parts = []
    for err in errors:
        raw_loc = tuple(err.get("loc", ()))
        loc = [str(x) for x in raw_loc if x != "body"]
        where = ".".join(([prefix] if prefix else []) + loc)
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        msg += _TYPE_FIXES.get(err.get("type"), "").format(given=_given(err.get("input")))
        if raw_loc == ("body",):
            where = "the request body"
            if err.get("type") in ("model_attributes_type", "dict_type", "missing"):
                msg += " (send a JSON object with Content-Type: application/json)"
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid request"


def parse_params(kind: str, raw: dict) -> P.Strict:
    """`raw` as the kind's parameter model; ValueError naming the kind or the bad fields."""
    try:
        return job_kind(kind).params.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(describe_errors(exc.errors(include_url=False), "params")) from exc


def check_plan(where: str, plan: dict, info) -> None:
    """The plan parses as a FrequencyPlan and fits the model's layers and KV heads."""
    from faedkv import FrequencyPlan

    try:
        parsed = FrequencyPlan.from_json(plan)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise ValueError(f"{where}.params.plan is not a valid plan ({exc}); build it with "
                         "FrequencyPlan (to_json) or the app's plan editor.") from exc
    if parsed.num_layers != info.num_layers:
        raise ValueError(f"{where}.params.plan has {parsed.num_layers} layers but {info.name} has "
                         f"{info.num_layers}; make the plan for this model (e.g. "
                         f"FrequencyPlan.low_pass(0.5, num_layers={info.num_layers})).")
    for layer in range(parsed.num_layers):
        for part in ("key", "value"):
            if parsed.is_per_head(layer, part):
                heads = len(parsed.layers[layer][part])
                if heads != info.num_kv_heads:
                    raise ValueError(f"{where}.params.plan layer {layer} ({part}s) lists {heads} "
                                     f"heads but {info.name} has {info.num_kv_heads} KV heads; "
                                     "give one list per KV head, or one list for all heads.")


def check_press(where: str, spec: P.MethodSpec, model, shortest: int, what: str) -> None:
    """Build the method's press (its own argument checks run) and, for FAEDKV, ask it for the
    slots of the shortest prompt (its budget rule): a ValueError here is the user's."""
    from analysis.harness.methods import build_press

    try:
        press = build_press(spec, model)
    except (ValueError, TypeError, AssertionError) as exc:
        raise ValueError(f"{where} ({spec.name}): {exc}") from exc
    try:
        if press is not None and hasattr(press, "num_slots"):
            press.num_slots(shortest)
    except ValueError as exc:
        raise ValueError(f"{where} ({spec.name}) cannot compress {what}: {exc}") from exc


def check_methods(kind: JobKind, params: P.Strict, info, tokenizer, model=None) -> None:
    """What the parameter models cannot know: plans against the model, each method's minimum
    prompt against the job's shortest prompt, duplicate labels."""
    specs = kind.methods(params)
    if not specs:
        return
    shortest, what = kind.shortest(params, tokenizer)
    for where, spec in specs:
        plan = spec.params.get("plan")
        if plan is not None:
            check_plan(where, plan, info)
        ratios = spec.params.get("layer_ratios")
        if ratios is not None and len(ratios) != info.num_layers:
            raise ValueError(f"{where}.params.layer_ratios has {len(ratios)} ratios but {info.name} has "
                             f"{info.num_layers} layers; derive them for this model (python -m "
                             "analysis layer-budget)")
        if model is not None:
            check_press(where, spec, model, shortest, what)
        need, why = P.minimum_tokens(spec)
        if shortest < need:
            raise ValueError(f"{where} ({spec.name} at ratio {spec.compression_ratio:g}) needs a "
                             f"prompt of at least {need} tokens ({why}), but {what} is shorter; "
                             "lengthen the prompt or lower that parameter.")
    if not kind.interactive:
        from analysis.tasks import unique_labels

        unique_labels(kind.full_params(params).methods)


def check_bounds(kind: str, params: P.Strict, info, tokenizer, max_cells: int,
                 model=None) -> None:
    """ValueError unless the job fits the loaded model (context, layers, heads, every method's
    needs, the kind's own check) and the server's cell limit."""
    declared = job_kind(kind)
    n, what = declared.context(params, tokenizer)
    if n > info.context_length:
        raise ValueError(f"{what} = {n} tokens exceeds the model context of {info.context_length} "
                         f"tokens ({info.name}); shorten the prompt or lower the lengths.")
    if declared.check is not None:
        declared.check(params, info)
    check_methods(declared, params, info, tokenizer, model)
    cells = declared.num_cells(params, info.num_layers)
    if cells > max_cells:
        raise ValueError(f"the job has {cells} cells, more than this server's limit of "
                         f"{max_cells} (--max-cells); split it into smaller grids.")


def token_bits(token: str) -> float:
    """A generous estimate of a token's entropy: length x log2(size of the character classes it
    uses: hex digits, lower case, upper case, digits, other); a token of few distinct characters
    counts as that few symbols."""
    chars = set(token)
    if chars <= set("0123456789abcdef") or chars <= set("0123456789ABCDEF"):
        alphabet = 16
    else:
        alphabet = (26 * any(c.islower() for c in chars) + 26 * any(c.isupper() for c in chars)
                    + 10 * any(c.isdigit() for c in chars)
                    + 32 * any(not c.isalnum() for c in chars))
    alphabet = min(alphabet, len(chars) ** 2)
    return len(token) * math.log2(max(alphabet, 2)) if len(chars) > 1 else 0.0


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a strong token."""
    if host not in LOOPBACK and not token:
        raise ValueError(f"refusing to listen on {host!r} without a token: anyone who can reach "
                         "it could run jobs and delete results. Set FAEDKV_TOKEN (or pass "
                         "--token) to a long random secret, or bind to 127.0.0.1.")
    if host not in LOOPBACK and token_bits(token) < MIN_TOKEN_BITS:
        raise ValueError(f"refusing to listen on {host!r} with a weak token (about "
                         f"{token_bits(token):.0f} bits, at least {MIN_TOKEN_BITS} needed): use "
                         "16 random bytes or more, e.g. FAEDKV_TOKEN=$(openssl rand -hex 16).")


def _shown(text: str, limit: int = 40) -> str:
    """A client-supplied string as it appears in an error message (repr, cut short)."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def _check_key(key: str) -> str:
    if not _KEY.fullmatch(key):
        raise HTTPException(422, f"run key {_shown(key)} is malformed: use the 16-hex-digit key "
                                 "(or <kind>-<key>) that GET /runs lists.")
    return key


def _check_job_id(job_id: str) -> str:
    if not _JOB_ID.fullmatch(job_id):
        raise HTTPException(404, f"no job {_shown(job_id)} (job ids are 32 hex digits); list the "
                                 "jobs with GET /jobs.")
    return job_id


def host_allowed(host_header: str | None) -> bool:
    """Is the request's Host header the loopback (what a tokenless server answers)?"""
    if not host_header:
        return False
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host in LOOPBACK


class Redactor:
    """Removes server paths (the store, the project, the home folder) from client-facing text."""

    def __init__(self, store_root: str | os.PathLike):
        root = Path(store_root)
        pairs = [(str(root.resolve()), "<store>"), (str(root.absolute()), "<store>"),
                 (str(_REPO), "<project>"), (str(Path.home()), "~")]
        if str(root) not in (".", ""):
            pairs.append((str(root), "<store>"))
        self.pairs = sorted({p for p in pairs if len(p[0]) > 1}, key=lambda p: -len(p[0]))

    def __call__(self, text: str) -> str:
        for path, name in self.pairs:
            text = text.replace(path, name)
        return text


# ---------------------------------------------------------------------------------- the app


def create_app(loaded, store_root: str | os.PathLike, *, token: str | None = None,
               max_cells: int = P.MAX_GRID_CELLS, import_assets: str | os.PathLike | None = None,
               executor: str = "local", ray_address: str | None = None,
               read_only: bool = False, max_queued: int = MAX_QUEUED) -> FastAPI:
    """The FastAPI app serving `loaded` (a LoadedModel) and the store at `store_root`.
    StoreLocked when another process writes the store (unless `read_only`)."""
    store = ResultsStore(store_root, read_only=read_only)
    if not read_only:
        store.lock()
    redact = Redactor(store_root)
    if import_assets is not None and Path(import_assets).is_dir() and not read_only:
        try:
            copied = store.import_runs(import_assets)
            if copied:
                log.info("imported %d shipped runs from %s", copied, import_assets)
        except StoreError as exc:
            log.warning("shipped runs in %s not imported: %s", import_assets, exc)
    queue = JobQueue(loaded, store_root, executor=executor, ray_address=ray_address,
                     read_only=read_only, max_queued=max_queued)
    warnings = [redact(w) for w in store.repairs + [f"skipped {s}" for s in queue.skipped]]
    for warning in warnings:
        log.warning("start-up: %s", warning)
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
        expected = token.encode()

        @app.middleware("http")
        async def require_token(request: Request, call_next):
            scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
                return JSONResponse(status_code=401, content={
                    "detail": "missing or wrong token: send 'Authorization: Bearer <token>' with "
                              "the server's token (its --token or FAEDKV_TOKEN)."})
            return await call_next(request)
    else:
        @app.middleware("http")
        async def loopback_host_only(request: Request, call_next):
            # DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends its own Host.
            if not host_allowed(request.headers.get("host")):
                return JSONResponse(status_code=421, content={
                    "detail": "this server has no token, so it answers only requests addressed "
                              "to the loopback (Host 127.0.0.1, localhost or [::1]); use "
                              "http://127.0.0.1:<port>, or start it with a token."})
            return await call_next(request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if detail == "There was an error parsing the body":
            detail = ("the request body could not be read: send a JSON object with "
                      "Content-Type: application/json (UTF-8).")
        elif exc.status_code in (404, 405) and detail in ("Not Found", "Method Not Allowed"):
            detail = (f"no endpoint {request.method} {_shown(request.url.path, 60)}; the API is "
                      "listed at GET /openapi.json (and /docs).")
        return JSONResponse(status_code=exc.status_code, content={"detail": redact(detail)},
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(status_code=400, content={
                "detail": "the request body is not valid JSON (" + describe_errors(errors)
                          + "); send a JSON object with Content-Type: application/json."})
        return JSONResponse(status_code=422, content={"detail": redact(describe_errors(errors))})

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse(status_code=500, content={
            "detail": redact(f"internal error ({exc.__class__.__name__}: {exc}); see the server log.")})

    def writable() -> None:
        if read_only:
            raise HTTPException(403, "this server opened its store read-only (another server "
                                     "writes it): it serves results and /generate, not jobs or "
                                     "deletes; send this to the server that writes the store.")

    def validated(kind: str, raw: dict) -> P.Strict:
        try:
            params = parse_params(kind, raw)
            check_bounds(kind, params, info, tokenizer, max_cells, loaded.model)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc
        return params

    def submit(kind: str, params: P.Strict) -> dict:
        if not job_kind(kind).interactive:
            writable()
        try:
            return queue.submit(kind, params)
        except JobUnavailable as exc:
            raise HTTPException(501, str(exc)) from exc
        except QueueFull as exc:
            raise HTTPException(429, str(exc)) from exc

    def find_run(key: str):
        _check_key(key)
        try:
            return store.get(key)
        except StoreError as exc:
            if any(store.runs_dir.glob(f"*-{key}")) or (store.runs_dir / key).is_dir():
                raise HTTPException(409, f"run {key!r} cannot be read: {exc}") from exc
            raise HTTPException(404, f"no run {key!r} in the store; list the runs with "
                                     "GET /runs.") from exc

    def summary(run) -> dict:
        for row in store.runs(kind=run.kind, limit=1_000_000):
            if row["key"] == run.key:
                return row
        return {"key": run.key, "kind": run.kind, "status": run.status, "error": run.error,
                "created": run.created, "updated": run.created,
                "cells_done": len(run.inspect()[0]), "cells_total": run.cells_total,
                "config": run.config, "metrics": None}

    @app.get("/health", summary="Liveness, the loaded model and the queue")
    def health() -> dict:
        return {"status": "ok", "model": info.to_dict(), "commit": project_commit(),
                "queue": queue.summary(), "max_cells": max_cells, "read_only": read_only,
                "warnings": warnings}

    @app.get("/methods", summary="Method names and options the server accepts")
    def methods() -> dict:
        return {"methods": list(P.METHODS), "variants": list(P.VARIANTS),
                "key_spaces": list(P.KEY_SPACES), "suite_tasks": list(P.SUITE_TASKS),
                "query_modes": list(P.QUERY_MODES), "needle_kinds": list(P.NEEDLE_KINDS),
                "job_kinds": {kind: why is None for kind, why in availability().items()}}

    @app.get("/runs", summary="Runs in the store, newest first")
    def runs(kind: str | None = Query(None, pattern=r"^[A-Za-z0-9_]+$", max_length=64),
             limit: int = Query(200, ge=1, le=10_000)) -> list[dict]:
        try:
            return store.runs(kind=kind, limit=limit)
        except StoreError as exc:
            if read_only:
                raise HTTPException(503, "the store's index cannot be read; the server that "
                                         "writes the store rebuilds it, try again.") from exc
            store.repair_index(exc)          # damaged while we run: rebuild it and answer
            warnings.append(redact(store.repairs[-1]))
            return store.runs(kind=kind, limit=limit)

    @app.get("/runs/{key}", summary="One run with its cell records")
    def run(key: str) -> dict:
        found = find_run(key)
        try:
            records, damaged = found.inspect()
            row = summary(found)
        except StoreError as exc:
            raise HTTPException(409, f"run {key!r} cannot be read: {exc}") from exc
        if row["status"] == "complete" and (damaged or len(records) < (row["cells_total"] or 0)):
            row = {**row, "status": "incomplete", "error": INCOMPLETE_RUN}
        row["cells_done"] = len(records)
        return {**row, "records": [{**rec, "cell_id": cid} for cid, rec in sorted(records.items())],
                "arrays": found.array_names(),
                # intact cells are served; these are recomputed when the job is submitted again
                "damaged_cells": [path.name for path, _ in damaged]}

    @app.get("/runs/{key}/arrays/{name}", summary="A stored array file as nested lists")
    def array(key: str, name: str) -> dict:
        found = find_run(key)
        if not _ARRAY.fullmatch(name) or name not in found.array_names():
            raise HTTPException(404, f"run {key!r} has no array {name!r} (has: "
                                     f"{', '.join(found.array_names()) or 'none'}).")
        try:
            return json_safe(found.get_array(name))
        except StoreError as exc:
            raise HTTPException(409, f"run {key!r} array {name!r} cannot be read: {exc}") from exc

    @app.delete("/runs/{key}", summary="Delete a run")
    def delete_run(key: str) -> dict:
        writable()
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
            check_bounds("generate", params, info, tokenizer, max_cells, loaded.model)
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
    p = argparse.ArgumentParser(prog="python -m analysis.service.server", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="smollm2-135m-instruct (default, embedded), a .gguf file, tiny-random-llama, tiny-random-qwen2, random-llama3-8b, a HF id or a folder")
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
    p.add_argument("--read-only", action="store_true",
                   help="serve a store another server writes: results and /generate, no jobs, "
                        "no deletes")
    p.add_argument("--max-queued", type=int, default=MAX_QUEUED,
                   help=f"queued jobs accepted at most (then 429; default {MAX_QUEUED})")
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
    if args.max_cells < 1 or args.max_queued < 1:
        print("error: --max-cells and --max-queued must be at least 1", file=sys.stderr)
        return 2
    holder = None if args.read_only else lock_holder(args.store)
    if holder is not None:
        # Before the model loads: a second server on the store fails in a second, not a minute.
        print(f"error: {locked_message(args.store, holder)}", file=sys.stderr)
        return 2

    from analysis.harness.models import ModelLoadError, load_model

    try:
        loaded = load_model(args.model, device=args.device, dtype=args.dtype,
                            attn_implementation=args.attn_implementation)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    try:
        app = create_app(loaded, args.store, token=token, max_cells=args.max_cells,
                         import_assets=args.import_assets or None, executor=args.executor,
                         ray_address=args.ray_address, read_only=args.read_only,
                         max_queued=args.max_queued)
    except (StoreError, OSError) as exc:    # StoreLocked: another server won the race
        print(f"error: {exc}", file=sys.stderr)
        return 2
    info = loaded.info
    print(f"FAEDKV backend: {info.name} ({info.dtype}, {info.device}), store {args.store}, "
          f"http://{args.host}:{args.port}" + (" (token required)" if token else "")
          + (" (read-only)" if args.read_only else ""), flush=True)
    # A /generate request waits for its job: give open requests 5 s at shutdown, after which
    # the queue's stop() marks what is left "interrupted" and wakes them.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
