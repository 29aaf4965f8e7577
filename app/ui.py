"""Shared page pieces: the backend connection, error display, figure provenance, export buttons,
job progress with cancel, and the session's figure registry (for the Export page).

Every backend call goes through `call(...)`, which turns a BackendError (or a dropped
connection) into an st.error with the server's message and what to change: a page never
shows a traceback. Tests inject a fake client with `st.session_state[CLIENT_KEY] = fake`.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from analysis.api.client import TERMINAL, BackendClient, BackendError, LocalBackend
from app import export
from app.views import run_params  # noqa: F401 - pages read it from here

CLIENT_KEY = "faedkv_client"        # session_state override (tests, notebooks)
FIGURES_KEY = "_figures"            # session_state: name -> export.FigureEntry
STARTUP_TIMEOUT_S = 300.0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "style.css")


# ----------------------------------------------------------------------------- connection

@st.cache_resource(show_spinner=False)
def _backend() -> tuple[Any, Any]:
    """(client, local backend or None), once per Streamlit server process. With
    FAEDKV_BACKEND_URL set, talk to that server; otherwise start one on the embedded model."""
    url = os.environ.get("FAEDKV_BACKEND_URL")
    token = os.environ.get("FAEDKV_TOKEN") or None
    if url:
        return BackendClient(url, token=token), None
    local = LocalBackend(model=os.environ.get("FAEDKV_MODEL") or None,
                         store=os.environ.get("FAEDKV_STORE") or os.path.join(REPO, "results"))
    return local.start(), local


def backend_url() -> str:
    return os.environ.get("FAEDKV_BACKEND_URL") or "local backend (embedded model)"


def client():
    injected = st.session_state.get(CLIENT_KEY)
    if injected is not None:
        return injected
    return _backend()[0]


def connect() -> dict | None:
    """The backend's /health, starting the local backend when needed (spinner while it loads).
    Cached for the session once it answered; None (with an error shown) when it cannot."""
    if st.session_state.get("_health") is not None:
        return st.session_state["_health"]
    with st.spinner("starting backend... (loads the model once; first start takes up to a minute)"):
        try:
            c = client()
        except Exception as exc:  # noqa: BLE001 - shown as a message, never a traceback
            st.error(f"**Could not start the backend:** {exc}\n\n"
                     "Run `make backend` in another terminal and set FAEDKV_BACKEND_URL to its "
                     "address, or check the model installation (`make setup`).")
            return None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                health = c.health()
                break
            except BackendError as exc:
                if time.monotonic() > deadline or getattr(exc, "status", None) in (401, 403):
                    show_error("connecting to the backend", exc)
                    return None
            time.sleep(0.5)
    st.session_state["_health"] = health
    return health


def model_name() -> str:
    health = st.session_state.get("_health") or {}
    return (health.get("model") or {}).get("name", "model")


def model_info() -> dict:
    return (st.session_state.get("_health") or {}).get("model") or {}


def model_banner(info: dict) -> None:
    """The model the backend holds, on every page: results always belong to one model."""
    if not info:
        return
    st.caption(f":material/memory: Backend model **{info.get('name', '?')}** "
               f"({info.get('revision', '?')}) · {info.get('device', '?')} · "
               f"{info.get('dtype', '?')} · {plural(info.get('num_layers', '?'), 'layer')} · "
               f"at {backend_url()}")


def plural(n, word: str, many: str | None = None) -> str:
    """"1 sample", "3 samples" ("?" stays plural)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


# ----------------------------------------------------------------------------- errors

def _hint(exc: Exception) -> str:
    status = getattr(exc, "status", None) or getattr(exc, "status_code", None)
    if status == 401 or status == 403:
        return "Set FAEDKV_TOKEN to the token the backend was started with, then reload."
    if status == 404:
        return "It may have been deleted: pick another run, or compute it again."
    if status == 409:
        return "Wait for the running job to finish or cancel it, then try again."
    if status == 413 or status == 422 or status == 400:
        return "Change the parameter named above and submit again."
    if status is None or status >= 500:
        return (f"Check that the backend at {backend_url()} is running (`make backend`), "
                "then reload the page.")
    return ""


def validation_message(exc: Exception) -> str:
    """A pydantic ValidationError as one sentence per problem ("field: what is wrong."),
    without pydantic's type names and documentation links; other errors as their text."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    sentences = []
    for err in errors(include_url=False):
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        field = ".".join(str(part) for part in err.get("loc", ()))
        sentence = f"{field}: {msg}" if field else msg[:1].upper() + msg[1:]
        sentences.append(sentence.rstrip(".") + ".")
    return " ".join(sentences)


def show_error(what: str, exc: Exception) -> None:
    message = str(exc) or exc.__class__.__name__
    hint = _hint(exc)
    st.error(f"**{what.capitalize()} failed:** {message}" + (f"\n\n{hint}" if hint else ""))


def call(what: str, fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs), or None after showing the error as a message."""
    try:
        return fn(*args, **kwargs)
    except BackendError as exc:
        show_error(what, exc)
    except ValueError as exc:          # request validation (pydantic) before anything is sent
        st.error(f"**{what.capitalize()}:** {validation_message(exc)}")
    except Exception as exc:  # noqa: BLE001 - connection drops etc.: a message, not a traceback
        show_error(what, exc)
    return None


# ----------------------------------------------------------------------------- cached reads

def _memo() -> dict:
    return st.session_state.setdefault("_memo", {})


def runs(kind: str | None = None, limit: int = 50) -> list[dict]:
    result = call("listing runs", client().runs, kind=kind, limit=limit)
    return result or []


def run(key: str, fresh: bool = False) -> dict | None:
    """A run with its records; finished runs are cached for the session (the store never
    rewrites a finished run)."""
    memo = _memo()
    if not fresh and ("run", key) in memo:
        return memo[("run", key)]
    result = call(f"loading run {key}", client().run, key)
    if result is not None and result.get("status") == "complete":
        memo[("run", key)] = result
    return result


def arrays(key: str, name: str) -> dict[str, np.ndarray] | None:
    memo = _memo()
    if ("arrays", key, name) not in memo:
        result = call(f"loading arrays {name!r} of run {key}", client().array, key, name)
        if result is None:
            return None
        memo[("arrays", key, name)] = {k: np.asarray(v) for k, v in result.items()}
    return memo[("arrays", key, name)]


def run_model(summary: dict) -> str:
    model = (summary.get("config") or {}).get("model") or {}
    return model.get("name") if isinstance(model, dict) and model.get("name") else model_name()


def model_label(summary: dict) -> str:
    """A run's model as recorded: its name, with the revision when the run records one (two
    models stored under the same folder name differ there)."""
    model = (summary.get("config") or {}).get("model") or {}
    revision = model.get("revision") if isinstance(model, dict) else None
    return f"{run_model(summary)} ({revision})" if revision else run_model(summary)


def models_of(summaries: list[dict]) -> list[str]:
    """The model labels of some runs, the backend's model first, each once."""
    labels = {model_label(s): same_model(s) for s in summaries}
    return sorted(labels, key=lambda m: (not labels[m], m))


def same_model(summary: dict) -> bool:
    """Whether a run was computed on the model the backend holds (name, and revision when both
    sides know it). A run without a model record counts as this model's."""
    model = (summary.get("config") or {}).get("model")
    if not isinstance(model, dict) or not model.get("name"):
        return True
    info = model_info()
    if model["name"] != info.get("name", model["name"]):
        return False
    revision, current = model.get("revision"), info.get("revision")
    return revision is None or current is None or revision == current


def run_details(summary: dict) -> str:
    """What a run was computed on, in a few words: tokens, chunks, samples."""
    p = run_params(summary)
    parts = []
    if p.get("lengths"):
        parts.append("/".join(str(n) for n in p["lengths"]) + " tok")
    else:
        tokens = p.get("num_tokens") or p.get("prefix_tokens") or p.get("context_length")
        if tokens:
            parts.append(f"{tokens} tok")
    if p.get("chunks"):
        parts.append(plural(p["chunks"], "chunk"))
    if p.get("samples"):
        parts.append(plural(p["samples"], "sample"))
    if p.get("num_texts"):
        parts.append(plural(p["num_texts"], "text"))
    return " · ".join(parts)


def run_label(summary: dict) -> str:
    created = str(summary.get("created", ""))[:16].replace("T", " ")
    cells = f"{summary.get('cells_done', '?')}/{summary.get('cells_total', '?')}"
    details = run_details(summary)
    other = "" if same_model(summary) else f" · OTHER MODEL {model_label(summary)}"
    return (f"{created} · {summary.get('status', '?')} · {cells} cells" +
            (f" · {details}" if details else "") + f" · {summary.get('key', '')[:10]}" + other)


def current_model_first(summaries: list[dict]) -> list[dict]:
    """Runs of the backend's model first (newest first within each group)."""
    return sorted(summaries, key=lambda s: not same_model(s))


def warn_other_model(summary: dict) -> None:
    if not same_model(summary):
        st.warning(f"This run was computed on **{model_label(summary)}**, not on the model the "
                   f"backend holds ({model_name()}): do not compare its numbers with this "
                   "model's runs.", icon=":material/warning:")


def pick_run(page: str, kind: str, summaries: list[dict], key_name: str = "run") -> dict | None:
    """Select box over runs of one kind (newest first); the choice lives in the URL."""
    from app import state

    if not summaries:
        return None
    summaries = current_model_first(summaries)
    keys = [s["key"] for s in summaries]
    by_key = {s["key"]: s for s in summaries}
    wkey = state.bind(page, key_name, keys[0], valid=lambda k: k in by_key)
    chosen = st.selectbox(f"{kind} run", keys, key=wkey, format_func=lambda k: run_label(by_key[k]))
    warn_other_model(by_key[chosen])
    return by_key[chosen]


def show_run_of(page: str) -> Callable[[dict], None]:
    """A job_panel on_done callback: select the finished job's run in `page`'s run picker."""
    from app import state

    def select(job: dict) -> None:
        if job.get("run_key"):
            st.session_state.pop(f"{page}.run", None)
            st.session_state.get(state._MEMORY, {}).get(page, {}).pop("run", None)
            st.query_params["run"] = job["run_key"]

    return select


# ----------------------------------------------------------------------------- jobs

def submit(kind: str, params) -> dict | None:
    """POST /jobs; params is a validated params model (or a dict)."""
    body = params.model_dump(mode="json") if hasattr(params, "model_dump") else params
    return call(f"starting the {kind} job", client().submit, kind, body)


def attach_job(slot: str, kind: str) -> str | None:
    """The id of the `kind` job this page watches: the one it started, else (after a reload, or
    from a shared link with ?job=<id>) the backend's queued or running job of that kind.
    A link to a job that has finished opens its run instead."""
    if st.session_state.get(slot):
        return st.session_state[slot]
    jobs = call("listing jobs", client().jobs) or []
    wanted = st.query_params.get("job")
    linked = next((j for j in jobs if j.get("id") == wanted and j.get("kind") == kind), None)
    if linked is not None and linked.get("status") in TERMINAL:
        del st.query_params["job"]
        if linked.get("run_key"):
            st.query_params["run"] = linked["run_key"]
        return None
    live = [j for j in jobs if j.get("kind") == kind and j.get("status") not in TERMINAL]
    job = linked or (live[0] if live else None)
    if job is None:
        if wanted and linked is None:
            del st.query_params["job"]
        return None
    st.session_state[slot] = job["id"]
    st.session_state[slot + ".params"] = job.get("params")
    return job["id"]


def watch_job(slot: str, job: dict) -> None:
    """Start watching a job this page submitted (its id also goes into the URL)."""
    st.session_state[slot] = job["id"]
    st.session_state[slot + ".params"] = job.get("params")
    st.query_params["job"] = job["id"]


def job_finished(slot: str) -> None:
    st.session_state.pop(slot, None)
    if "job" in st.query_params:
        del st.query_params["job"]


def job_panel(slot: str, on_done: Callable[[dict], None] | None = None,
              kind: str | None = None) -> dict | None:
    """Progress bar + Cancel for the job whose id is in session_state[slot] (or, with `kind`,
    the backend's running job of that kind: see attach_job); polls every second in a fragment
    so the rest of the page stays put. On a terminal status, clears the slot, calls
    on_done(job) and reruns the page once. Returns the last job seen."""
    job_id = attach_job(slot, kind) if kind else st.session_state.get(slot)
    if not job_id:
        return None
    if st.query_params.get("job") != job_id:
        st.query_params["job"] = job_id

    @st.fragment(run_every=1.0)
    def panel():
        job = call("reading job status", client().job, job_id)
        if job is None:
            job_finished(slot)
            return
        st.session_state[slot + ".last"] = job
        progress = job.get("progress") or {}
        done, total = int(progress.get("done") or 0), int(progress.get("total") or 0)
        fraction = done / total if total else 0.0
        status = job.get("status", "?")
        left, right = st.columns([5, 1], vertical_alignment="center")
        left.progress(min(1.0, fraction), text=f"{job.get('kind', 'job')} {status}: "
                      f"{done}/{total or '?'} cells")
        if status not in TERMINAL:
            if right.button("Cancel", key=f"{slot}.cancel", type="secondary"):
                call("cancelling the job", client().cancel, job_id)
            return
        job_finished(slot)
        if status == "failed":
            st.error(f"**The {job.get('kind')} job failed:** {job.get('error')}")
        elif status in ("cancelled", "interrupted"):
            st.warning("Job cancelled; the cells it finished are kept in the store.")
        if on_done is not None:
            on_done(job)
        if status == "done":
            st.rerun(scope="app")

    panel()
    return st.session_state.get(slot + ".last")


# ----------------------------------------------------------------------------- figures

def provenance_line(prov: dict) -> str:
    parts = [prov.get("model"), prov.get("text"), prov.get("method"), prov.get("budget")]
    return " · ".join(str(p) for p in parts if p)


def show_entry(entry: export.FigureEntry) -> None:
    """Chart (its subtitle is the provenance, so exported files carry it) + export buttons;
    the session's registry keeps the view as shown (the Export page prefers it to the stored
    run's default view)."""
    st.session_state.setdefault(FIGURES_KEY, {})[entry.key()] = entry
    st.plotly_chart(entry.figure, key=f"chart.{entry.name}", config={"displaylogo": False})
    export_buttons(entry)


def export_buttons(entry: export.FigureEntry, key: str = "") -> None:
    stem = entry.stem()
    key = key or entry.name
    cols = st.columns([1, 1, 1, 1, 1, 3])
    for col, fmt in zip(cols, export.IMAGE_FORMATS):
        col.download_button(fmt.upper(), data=_deferred_image(entry.figure, fmt),
                            file_name=f"{stem}.{fmt}", mime=_MIME[fmt], key=f"dl.{key}.{fmt}",
                            on_click="ignore", width="stretch",
                            help=f"Download the figure as {fmt.upper()}")
    if entry.data is not None:
        cols[3].download_button("CSV", data=export.csv_bytes(entry.data), file_name=f"{stem}.csv",
                                mime="text/csv", key=f"dl.{key}.csv", on_click="ignore",
                                width="stretch", help="Download the plotted data")
    cols[4].download_button(
        "JSON", data=export.json_bytes({"title": entry.title, "provenance": entry.provenance,
                                        "config": entry.config}),
        file_name=f"{stem}.json", mime="application/json", key=f"dl.{key}.json",
        on_click="ignore", width="stretch", help="Download what produced it (config, provenance)")


_MIME = {"png": "image/png", "svg": "image/svg+xml", "pdf": "application/pdf"}


def _deferred_image(fig: go.Figure, fmt: str) -> Callable[[], bytes]:
    """Images are rendered only when the button is clicked (kaleido takes ~0.2 s each)."""
    frozen = go.Figure(fig)
    return lambda: export.figure_bytes(frozen, fmt)


# ----------------------------------------------------------------------------- page chrome

def page_setup(title: str, intro: str) -> dict | None:
    """Title, one-line explanation, styles; connects to the backend (None: page should stop)."""
    if os.path.exists(CSS):
        with open(CSS) as f:
            st.html(f"<style>{f.read()}</style>")
    st.title(title)
    st.caption(intro)
    health = connect()
    if health is not None:
        model_banner(health.get("model") or {})
    return health


def empty_state(message: str) -> None:
    st.info(message, icon=":material/info:")
