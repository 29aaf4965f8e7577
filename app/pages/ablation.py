"""Ablation: the loss increase when one frequency chunk of one layer is removed, and the plans
derived from it (each layer keeps its chunks with the largest loss increase)."""
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:    # AppTest runs a page file on its own
    sys.path.insert(0, ROOT)

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from analysis.api.params import AblateParams  # noqa: E402
from analysis.api import plans  # noqa: E402
from app import state, ui, views  # noqa: E402

PAGE = "ablation"
JOB = "ablation.job"
ARRAYS = "ablation"


def compute_form(layers: int, context: int) -> None:
    with st.form("ablation.compute"):
        st.markdown(f"**Compute an ablation**: for each layer and chunk, remove that chunk (keys "
                    f"and values, all heads) and measure the loss increase. {layers} layers × "
                    "chunks + 1 forward passes per text: minutes on the embedded model.")
        c1, c2, c3, c4 = st.columns(4)
        chunks = c1.number_input("chunks", 2, 256, 22)
        target = c2.selectbox("remove from", ("kv", "keys", "values"))
        prefix = c3.number_input("prefix tokens", 64, context, min(2048, context), step=256)
        cont = c4.number_input("continuation tokens", 8, 4096, 256, step=64)
        c1, c2, c3, c4 = st.columns(4)
        texts = c1.number_input("texts", 1, 49, 3)
        needle = c2.number_input("needle samples", 0, 50, 2, help="0: skip the needle measure")
        sink = c3.number_input("sink tokens", 0, 4096, 4)
        window = c4.number_input("recent window", 0, 65536, 64)
        if st.form_submit_button("Compute ablation", type="primary", icon=":material/play_arrow:"):
            params = ui.call("checking the parameters", AblateParams, chunks=int(chunks),
                             target=target, prefix_tokens=int(prefix), continuation_tokens=int(cont),
                             num_texts=int(texts), needle_samples=int(needle), sink_tokens=int(sink),
                             window=int(window))
            job = ui.submit("ablate", params) if params is not None else None
            if job:
                ui.watch_job(JOB, job)



def plan_comparison(metrics: dict) -> pd.DataFrame | None:
    """The run's comparison of plans (rows of {plan, ratio, metric...}), when it has one."""
    table = metrics.get("plan_comparison")
    if isinstance(table, list) and table and isinstance(table[0], dict):
        return pd.DataFrame(table)
    return None


def main() -> None:
    health = ui.page_setup("Ablation", "Which frequency chunks does each layer need? Red: removing "
                           "the chunk raises the loss (keep it); blue: removing it helps.")
    if health is None:
        st.stop()
    info = health.get("model") or {}
    summaries = [r for r in ui.runs("ablate") if r.get("status") == "complete"]
    with st.expander("Compute an ablation", expanded=not summaries, icon=":material/add_chart:"):
        compute_form(int(info.get("num_layers") or 1), int(info.get("context_length") or 8192))
        ui.job_panel(JOB, on_done=ui.show_run_of(PAGE), kind="ablate")
    if not summaries:
        ui.empty_state("No ablation run in the store yet: compute one above (or ship "
                       "assets/results).")
        return
    summary = ui.pick_run(PAGE, "ablation", summaries)
    data = ui.arrays(summary["key"], ARRAYS)
    if data is None:
        return
    measures = views.ablation_measures(data)
    c1, c2 = st.columns([2, 3])
    measure = c1.segmented_control("loss", measures, key=state.bind(
        PAGE, "measure", measures[0], valid=state.options_valid(measures))) or measures[0]
    ratio = c2.slider("plan: fraction of chunks kept per layer", 0.05, 1.0, step=0.05,
                      key=state.bind(PAGE, "ratio", 0.25, float, lambda v: 0 < v <= 1))
    state.sync(PAGE, {"run": summary["key"], "measure": measure, "ratio": ratio})
    layers = views.ablation_layers(data)
    num_layers = int(info.get("num_layers") or len(layers)) if ui.same_model(summary) \
        else max(layers) + 1
    heatmap, plan_entry = views.ablation_entries(summary, data, measure, ratio, num_layers)
    ui.show_entry(heatmap)

    st.subheader("Derived plan")
    mask, _, name = views.ablation_plan(data, measure, ratio, num_layers)
    if len(layers) < num_layers:
        st.caption(f"Only layers {layers} were ablated: every other layer takes the scores of its "
                   "nearest ablated layer.")
    ui.show_entry(plan_entry)
    c1, c2 = st.columns([1, 3])
    c1.download_button("Download plan JSON", plans.to_json(mask, name), on_click="ignore",
                       file_name=f"plan_{name}_{ui.run_model(summary)}_{summary['key'][:10]}.json",
                       mime="application/json", icon=":material/download:", key="ablation.plan_json")
    if c2.button("Open in the frequency lab", icon=":material/tune:", key="ablation.to_lab",
                 disabled=not ui.same_model(summary),
                 help=None if ui.same_model(summary) else "This run is of another model."):
        st.session_state["lab.mask"] = mask
        st.session_state["lab.plan_name"] = name
        st.session_state["lab.version"] = st.session_state.get("lab.version", 0) + 1
        st.switch_page(str(Path(__file__).with_name("frequency_lab.py")))

    metrics = summary.get("metrics") or {}
    table = plan_comparison(metrics)
    if table is not None:
        st.subheader("Plan comparison")
        st.dataframe(table, hide_index=True, width="stretch")
    table = views.stored_plans(metrics)
    if table is not None:
        with st.expander("Plans stored with this run (computed by the ablation job)"):
            st.dataframe(table, hide_index=True, width="stretch")


main()
