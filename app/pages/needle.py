"""Needle in a haystack: configure a grid, start it, watch depth x length fill in per method."""
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:    # AppTest runs a page file on its own
    sys.path.insert(0, ROOT)

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from analysis.api.params import (FAEDKV_DEFAULT, METHODS, NEEDLE_KINDS, QUERY_MODES, VARIANTS,  # noqa: E402
                                 NeedleParams)
from app import figures, state, ui, views  # noqa: E402

PAGE = "needle"
JOB = "needle.job"
PENDING = "needle.pending"       # (params, cost sentence) of a grid waiting for confirmation
METRICS = ("exact", "partial", "rouge_l")
LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
DEFAULT_METHODS = ["faedkv", "snapkv", "streaming_llm"]
FAEDKV_CHOICES = ("default", *VARIANTS)     # FAEDKV's default configuration, or one variant plain


def faedkv_params(choice: str) -> dict:
    return dict(FAEDKV_DEFAULT) if choice == "default" else {"variant": choice}


CONFIRM_ABOVE_S = 600            # ask before starting a grid estimated to take longer
CONFIRM_UNTIMED_CELLS = 100      # ... or one this large when no cell was timed yet


def cell_seconds(summaries: list[dict]) -> dict[int, float]:
    """{context length: mean seconds per cell} measured by the stored needle grids of the
    backend's model (their metrics' by_length rows), over every method."""
    sums: dict[int, list[float]] = {}
    for summary in summaries:
        if not ui.same_model(summary):
            continue
        for row in ((summary.get("metrics") or {}).get("by_length") or []):
            if row.get("seconds") is not None and row.get("length") and row.get("n"):
                total = sums.setdefault(int(row["length"]), [0.0, 0])
                total[0] += float(row["seconds"]) * row["n"]
                total[1] += row["n"]
    return {length: t / n for length, (t, n) in sums.items() if n}


def estimate_seconds(params: NeedleParams, measured: dict[int, float]) -> float | None:
    """Seconds the grid should take: per length, its cells x the measured time per cell at the
    nearest timed length, scaled by length (None when no grid of this model was timed)."""
    if not measured:
        return None
    methods = len(params.methods) + (not any(m.name == "full" for m in params.methods))
    depths = len(params.depths) if params.depth_spacing == "given" else params.num_depths
    total = 0.0
    for length in params.lengths:
        nearest = min(measured, key=lambda n: (abs(n - length), n))
        total += methods * depths * params.samples * measured[nearest] * length / nearest
    return total


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def grid_cost(params: NeedleParams, summaries: list[dict]) -> tuple[str, bool]:
    """(one sentence on the grid's size and expected time, whether to ask before starting)."""
    cells = params.num_cells() + (0 if any(m.name == "full" for m in params.methods) else
                                  params.num_cells() // len(params.methods))
    measured = cell_seconds(summaries)
    seconds = estimate_seconds(params, measured)
    if seconds is None:
        return (f"{ui.plural(cells, 'cell')}; no needle grid of this model has been timed yet, "
                "so the time is unknown.", cells > CONFIRM_UNTIMED_CELLS)
    timed = ", ".join(f"{measured[n]:.1f} s at {n} tokens" for n in sorted(measured))
    return (f"{ui.plural(cells, 'cell')}, about {duration(seconds)} at the measured time per "
            f"cell ({timed}, from the stored grids).", seconds > CONFIRM_ABOVE_S)


def start(params: NeedleParams) -> None:
    job = ui.submit("needle", params)
    if job:
        ui.watch_job(JOB, {**job, "params": params.model_dump(mode="json")})
    st.session_state.pop(PENDING, None)


def configure(context: int, summaries: list[dict]) -> None:
    with st.form("needle.configure"):
        st.markdown("**New grid.** Every method runs on the same needle samples; the full cache "
                    "is added as the reference.")
        c1, c2 = st.columns([3, 2])
        methods = c1.multiselect("methods", [m for m in METHODS if m != "full"],
                                 default=DEFAULT_METHODS, key="needle.methods")
        ratios = c2.multiselect("compression ratios (fraction removed)",
                                [0.25, 0.5, 0.75, 0.875, 0.9], default=[0.75], key="needle.ratios")
        c1, c2, c3 = st.columns([3, 2, 1])
        lengths = c1.multiselect("context lengths (tokens)", [n for n in LENGTHS if n <= context],
                                 default=[1024, 2048], key="needle.lengths")
        depths = c2.multiselect("depths (%)", list(range(0, 101, 10)) + [25, 75],
                                default=[0, 25, 50, 75, 100], key="needle.depths")
        samples = c3.number_input("samples", 1, 100, 1, key="needle.samples")
        c1, c2, c3, c4 = st.columns(4)
        needle = c1.selectbox("needle kind", NEEDLE_KINDS, key="needle.kind")
        query_mode = c2.selectbox("query mode", QUERY_MODES, key="needle.query_mode",
                                  help="query_aware: the question is part of the compressed context")
        variant = c3.selectbox("faedkv", FAEDKV_CHOICES, key="needle.variant",
                               help="default: FAEDKV's default (the search's winner: the dimension split behind "
                                    "KVzip's ranking; extra passes after each prefill). A variant: that variant "
                                    "plain, without exact tokens.")
        max_new = c4.number_input("max new tokens", 1, 256, 24, key="needle.max_new")
        if st.form_submit_button("Start grid", type="primary", icon=":material/play_arrow:"):
            specs = [{"name": m, "compression_ratio": float(r),
                      "params": faedkv_params(variant) if m == "faedkv" else {}}
                     for m in methods for r in sorted(ratios)]
            params = ui.call("checking the grid", NeedleParams, methods=specs or [{"name": "full"}],
                             needle=needle, query_mode=query_mode, lengths=sorted(lengths),
                             depths=sorted(float(d) for d in set(depths)), samples=int(samples),
                             max_new_tokens=int(max_new))
            if params is not None and (not methods or not ratios or not lengths or not depths):
                st.error("Pick at least one method, ratio, length and depth.")
            elif params is not None:
                cost, ask = grid_cost(params, summaries)
                if ask:
                    st.session_state[PENDING] = (params, cost)
                else:
                    st.session_state["needle.cost"] = cost
                    start(params)
    pending = st.session_state.get(PENDING)
    if pending:
        params, cost = pending
        st.warning(f"**This grid is large:** {cost} Start it?", icon=":material/schedule:")
        c1, c2, _ = st.columns([1, 1, 4])
        if c1.button("Start anyway", type="primary", key="needle.confirm"):
            st.session_state["needle.cost"] = cost
            start(params)
            st.rerun()
        if c2.button("Don't start", key="needle.abandon"):
            st.session_state.pop(PENDING, None)
            st.rerun()


def live(metric: str) -> bool:
    """Progress, cancel and the grid as it fills in; polls the job and the run every second.
    After a reload (or from a shared link) it re-attaches to the backend's running grid."""
    job_id = ui.attach_job(JOB, "needle")
    if not job_id:
        return False
    if st.query_params.get("job") != job_id:
        st.query_params["job"] = job_id

    @st.fragment(run_every=1.0)
    def panel():
        job = ui.call("reading the job", ui.client().job, job_id)
        if job is None:
            ui.job_finished(JOB)
            return
        progress = job.get("progress") or {}
        done, total = int(progress.get("done") or 0), int(progress.get("total") or 0)
        status = job.get("status")
        c1, c2 = st.columns([6, 1], vertical_alignment="center")
        c1.progress(done / total if total else 0.0, text=f"needle grid {status}: {done}/{total or '?'} cells")
        if status in ("queued", "running"):
            if c2.button("Cancel", key="needle.cancel", icon=":material/stop:"):
                ui.call("cancelling the grid", ui.client().cancel, job_id)
        records = []
        if job.get("run_key"):
            run = ui.run(job["run_key"], fresh=True)
            records = (run or {}).get("records") or []
        params = job.get("params") or st.session_state.get(JOB + ".params") or {}
        labels, lengths, depths = views.needle_axes(params, records)
        st.plotly_chart(figures.needle_grid(records, labels, lengths, depths, metric=metric),
                        key="needle.live_chart", config={"displaylogo": False})
        if status in ui.TERMINAL:
            ui.job_finished(JOB)
            if status == "failed":
                st.error(f"**The needle grid failed:** {job.get('error')}")
            if job.get("run_key"):
                st.session_state.pop(f"{PAGE}.run", None)
                st.query_params["run"] = job["run_key"]
                st.session_state.get(state._MEMORY, {}).get(PAGE, {}).pop("run", None)
            st.rerun(scope="app")

    st.markdown("#### Running grid")
    if st.session_state.get("needle.cost"):
        st.caption(st.session_state["needle.cost"])
    panel()
    return True


def finished(metric: str, summaries: list[dict]) -> None:
    if not summaries:
        ui.empty_state("No needle grid in the store yet: configure one above and press Start.")
        return
    models = ui.models_of(summaries)
    if len(models) > 1:
        st.caption("Needle grids in the store of " + ui.plural(len(models), "model") + ": " +
                   ", ".join(f"{model} ({ui.plural(sum(ui.model_label(s) == model for s in summaries), 'grid')})"
                             for model in models) +
                   ". Any of them can be picked below (the backend's model first; another model's "
                   "grid is labelled OTHER MODEL).")
    summary = ui.pick_run(PAGE, "needle", summaries)
    state.sync(PAGE, {"run": summary["key"], "metric": metric})
    run = ui.run(summary["key"])
    if run is None:
        return
    records = run.get("records") or []
    if not records:
        ui.empty_state("This grid has no finished cell yet.")
        return
    ui.show_entry(views.needle_entries(summary, records, metric)[0])
    by_method = (run.get("metrics") or summary.get("metrics") or {}).get("by_method")
    if by_method:
        st.markdown("**Per method** (accuracy with 95% Wilson interval; `acc_given_full`: "
                    "accuracy on the samples the full cache answers)")
        cols = ["label", "ratio", "n", "accuracy", "ci_low", "ci_high", "acc_given_full",
                "partial", "rouge_l", "cache_length", "seconds"]
        frame = pd.DataFrame(by_method)
        st.dataframe(frame[[c for c in cols if c in frame]], hide_index=True, width="stretch")
    with st.expander("Answers"):
        frame = pd.DataFrame(records)
        cols = ["label", "length", "depth", "sample", "exact", "partial", "rouge_l", "expected",
                "prediction", "answer"]
        st.dataframe(frame[[c for c in cols if c in frame]], hide_index=True, width="stretch")


def main() -> None:
    health = ui.page_setup("Needle", "Hide a fact at a depth of a long essay and ask for it back: "
                           "does the compressed cache still hold it?")
    if health is None:
        st.stop()
    context = int((health.get("model") or {}).get("context_length") or 8192)
    summaries = ui.runs("needle")
    running = bool(ui.attach_job(JOB, "needle"))
    with st.expander("Configure a grid", expanded=not running and not summaries,
                     icon=":material/tune:"):
        configure(context, summaries)
    metric = st.segmented_control("score", METRICS, key=state.bind(
        PAGE, "metric", "exact", valid=state.options_valid(METRICS)))
    metric = metric or "exact"
    if not live(metric):
        finished(metric, summaries)


main()
