"""Needle in a haystack: configure a grid, start it, watch depth x length fill in per method."""
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:    # AppTest runs a page file on its own
    sys.path.insert(0, ROOT)

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from analysis.params import (METHODS, NEEDLE_KINDS, QUERY_MODES, VARIANTS, MethodSpec,  # noqa: E402
                             NeedleParams)
from app import figures, state, ui  # noqa: E402

PAGE = "needle"
JOB = "needle.job"
METRICS = ("exact", "partial", "rouge_l")
LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
DEFAULT_METHODS = ["faedkv", "snapkv", "streaming_llm"]


def method_label(spec: dict) -> str:
    """The label the needle task files a method's cells under (analysis.methods.method_label
    for the default params the app sends)."""
    m = MethodSpec(**spec)
    return "full" if m.name == "full" else m.label


def grid_axes(params: dict, records: list[dict]) -> tuple[list[str], list[int], list[float]]:
    """(method labels with full first, lengths, depths) of a grid: from its parameters, plus
    whatever the records hold (depths spaced by the server, labels with extra params)."""
    labels = ["full"] + [method_label(m) for m in params.get("methods", []) if m["name"] != "full"]
    lengths = [int(n) for n in params.get("lengths", [])]
    depths = [float(d) for d in params.get("depths", [])] \
        if params.get("depth_spacing", "given") == "given" else []
    for r in records:
        label = r.get("label", r.get("method"))
        if label not in labels:
            labels.append(label)
        if int(r["length"]) not in lengths:
            lengths.append(int(r["length"]))
        if float(r["depth"]) not in depths:
            depths.append(float(r["depth"]))
    return labels, sorted(lengths), sorted(depths)


def configure(context: int) -> None:
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
        variant = c3.selectbox("faedkv variant", VARIANTS, key="needle.variant")
        max_new = c4.number_input("max new tokens", 1, 256, 24, key="needle.max_new")
        if st.form_submit_button("Start grid", type="primary", icon=":material/play_arrow:"):
            specs = [{"name": m, "compression_ratio": float(r),
                      "params": {"variant": variant} if m == "faedkv" else {}}
                     for m in methods for r in sorted(ratios)]
            params = ui.call("checking the grid", NeedleParams, methods=specs or [{"name": "full"}],
                             needle=needle, query_mode=query_mode, lengths=sorted(lengths),
                             depths=sorted(float(d) for d in set(depths)), samples=int(samples),
                             max_new_tokens=int(max_new))
            if params is not None and (not methods or not ratios or not lengths or not depths):
                st.error("Pick at least one method, ratio, length and depth.")
            elif params is not None:
                job = ui.submit("needle", params)
                if job:
                    st.session_state[JOB] = job["id"]
                    st.session_state[JOB + ".params"] = params.model_dump(mode="json")


def heatmaps(params: dict, records: list[dict], metric: str, key: str):
    labels, lengths, depths = grid_axes(params, records)
    return figures.needle_grid(records, labels, lengths, depths, metric=metric), labels


def live(metric: str) -> None:
    """Progress, cancel and the grid as it fills in; polls the job and the run every second."""
    job_id = st.session_state.get(JOB)
    if not job_id:
        return

    @st.fragment(run_every=1.0)
    def panel():
        job = ui.call("reading the job", ui.client().job, job_id)
        if job is None:
            st.session_state.pop(JOB, None)
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
        fig, _ = heatmaps(params, records, metric, "live")
        st.plotly_chart(fig, key="needle.live_chart", config={"displaylogo": False})
        if status in ui.TERMINAL:
            st.session_state.pop(JOB, None)
            if status == "failed":
                st.error(f"**The needle grid failed:** {job.get('error')}")
            if job.get("run_key"):
                st.session_state.pop(f"{PAGE}.run", None)
                st.query_params["run"] = job["run_key"]
                st.session_state.get(state._MEMORY, {}).get(PAGE, {}).pop("run", None)
            st.rerun(scope="app")

    st.markdown("#### Running grid")
    panel()


def finished(metric: str) -> None:
    summaries = ui.runs("needle")
    if not summaries:
        ui.empty_state("No needle grid in the store yet: configure one above and press Start.")
        return
    summary = ui.pick_run(PAGE, "needle", summaries)
    state.sync(PAGE, {"run": summary["key"], "metric": metric})
    run = ui.run(summary["key"])
    if run is None:
        return
    records = run.get("records") or []
    params = ui.run_params(summary)
    if not records:
        ui.empty_state("This grid has no finished cell yet.")
        return
    fig, labels = heatmaps(params, records, metric, "done")
    lengths = grid_axes(params, records)[1]
    ratios = sorted({float(r.get("ratio", 0)) for r in records if r.get("method") != "full"})
    ratio = ratios[0] if len(ratios) == 1 else None
    prov = ui.provenance(model=ui.run_model(summary),
                         text=f"needle {params.get('needle', '?')}, {params.get('query_mode', '')}, "
                              f"{'/'.join(str(n) for n in lengths)} tokens, "
                              f"{params.get('samples', '?')} samples",
                         method=", ".join(labels),
                         budget=ui.budget_text(ratio) if ratio is not None else
                         "ratios " + ", ".join(f"{r:g}" for r in ratios), ratio=ratio)
    table = figures.needle_table(records, metric)
    ui.show_figure("needle-grid", f"Needle {metric} by depth and context length", fig, prov, table,
                   {"run": summary["key"], "params": params})
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
    has_runs = bool(ui.runs("needle", limit=1))
    with st.expander("Configure a grid", expanded=not st.session_state.get(JOB) and not has_runs,
                     icon=":material/tune:"):
        configure(context)
    metric = st.segmented_control("score", METRICS, key=state.bind(
        PAGE, "metric", "exact", valid=state.options_valid(METRICS)))
    metric = metric or "exact"
    if st.session_state.get(JOB):
        live(metric)
    else:
        finished(metric)


main()
