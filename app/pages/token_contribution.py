"""Token contribution: how much each original token still contributes to the compressed cache."""
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:    # AppTest runs a page file on its own
    sys.path.insert(0, ROOT)

import streamlit as st  # noqa: E402

from analysis.api.params import METHODS, ContribParams  # noqa: E402
from app import state, ui, views  # noqa: E402

PAGE = "contribution"
JOB = "contrib.job"
SUMMARY_HELP = ("1 − Gini of the contributions (1: every token equal); mean contribution of the "
                "oldest tenth over the newest tenth; smallest over largest contribution.")
DEFAULT_METHODS = ["faedkv", "dct_iterative", "streaming_llm", "snapkv"]


def compute_form(context: int) -> None:
    with st.form("contrib.compute"):
        st.markdown("**Compute contributions**: the norm of each original token's column in the "
                    "linear map from the full cache to the compressed one.")
        c1, c2, c3, c4 = st.columns([3, 1, 1, 1])
        methods = c1.multiselect("methods", [m for m in METHODS if m != "full"],
                                 default=DEFAULT_METHODS)
        ratio = c2.number_input("compression ratio", 0.0, 0.95, 0.75, step=0.05)
        length = c3.number_input("context (tokens)", 64, context, min(2048, context), step=256)
        seed = c4.number_input("text seed", 0, 10_000, 0)
        if st.form_submit_button("Compute contributions", type="primary", icon=":material/play_arrow:"):
            if not methods:
                st.error("Pick at least one method.")
                return
            params = ui.call("checking the parameters", ContribParams,
                             methods=[{"name": m, "compression_ratio": float(ratio)} for m in methods],
                             context_length=int(length), text_seed=int(seed))
            job = ui.submit("contrib", params) if params is not None else None
            if job:
                ui.watch_job(JOB, job)



def main() -> None:
    health = ui.page_setup("Token contribution", "FAEDKV's claim: every past token contributes "
                           "equally to the compressed cache (each token enters its class mean "
                           "with weight 1/count, and the mean counts log(count) in attention), "
                           "unlike eviction (drops tokens) and iterative compression (blurs old "
                           "tokens more).")
    if health is None:
        st.stop()
    context = int((health.get("model") or {}).get("context_length") or 8192)
    summaries = [r for r in ui.runs("contrib") if r.get("status") == "complete"]
    with st.expander("Compute contributions", expanded=not summaries, icon=":material/add_chart:"):
        compute_form(context)
        ui.job_panel(JOB, on_done=ui.show_run_of(PAGE), kind="contrib")
    if not summaries:
        ui.empty_state("No contribution run in the store yet: compute one above.")
        return
    summary = ui.pick_run(PAGE, "contrib", summaries)
    state.sync(PAGE, {"run": summary["key"]})
    run = ui.run(summary["key"])
    if run is None:
        return
    entries = views.contribution_entries(summary, run.get("records") or [])
    for entry in entries:
        ui.show_entry(entry)
        if entry.name == "contribution-summary":
            st.caption(SUMMARY_HELP)
    if not entries:
        ui.empty_state("This run holds no contribution records.")


main()
