"""Spectra: per-layer, per-head energy of keys/values along the token axis (a "spectra" run)."""
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:    # AppTest runs a page file on its own
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import streamlit as st  # noqa: E402

from analysis.api.params import SpectraParams  # noqa: E402
from app import state, ui, views  # noqa: E402

PAGE = "spectra"
JOB = "spectra.job"
KV, SPACES, TRANSFORMS, SPACE_LABEL = views.KV, views.SPACES, views.TRANSFORMS, views.SPACE_LABEL
TRANSFORM_LABEL = {"iwdft": "IWDFT (what FAEDKV keeps)", "dft": "plain DFT"}


def compute_form(model_context: int) -> None:
    with st.form("spectra.compute"):
        st.markdown("**Compute spectra** for a text length (one job: a forward pass, then the "
                    "energy of every layer's keys and values).")
        c1, c2, c3, c4 = st.columns(4)
        tokens = c1.number_input("text length (tokens)", 64, model_context, min(2048, model_context),
                                 step=256)
        seed = c2.number_input("text seed", 0, 10_000, 0, help="which essays (0 = the first)")
        grid = c3.number_input("frequency grid points", 17, 4097, 257)
        chunks = c4.number_input("chunks", 2, 256, 22)
        if st.form_submit_button("Compute spectra", type="primary", icon=":material/play_arrow:"):
            params = ui.call("checking the parameters", SpectraParams, num_tokens=int(tokens),
                             text_seed=int(seed), grid_points=int(grid), chunks=int(chunks))
            job = ui.submit("spectra", params) if params is not None else None
            if job:
                ui.watch_job(JOB, job)



INTRO = ("Where the energy of each layer's keys and values sits along the token axis (dotted "
         "lines: the chunk grid a plan keeps or drops). FAEDKV stores the compressed middle as "
         "M class means (each mean weighs its tokens equally) and adds log(count) to each mean's "
         "attention logit; a plan band-limits the sequence of means to the chunks it keeps.")


def main() -> None:
    health = ui.page_setup("Spectra", INTRO)
    if health is None:
        st.stop()
    context = int((health.get("model") or {}).get("context_length") or 8192)
    summaries = [r for r in ui.runs("spectra") if r.get("status") == "complete"]
    with st.expander("Compute spectra for another text length", expanded=not summaries,
                     icon=":material/add_chart:"):
        compute_form(context)
        ui.job_panel(JOB, on_done=ui.show_run_of(PAGE), kind="spectra")
    if not summaries:
        ui.empty_state("No spectra run in the store yet: compute one above (about a minute on the "
                       "embedded model, a few seconds on the tiny one).")
        return

    summary = ui.pick_run(PAGE, "spectra", summaries)
    data = ui.arrays(summary["key"], "spectra")
    if data is None:
        return
    layers_n, heads_n = np.shape(data["energy"])[:2]
    all_layers, all_heads = list(range(layers_n)), list(range(heads_n))

    c1, c2, c3, c4 = st.columns([3, 2, 2, 3])
    layers = c1.multiselect("layers", all_layers, key=state.bind(
        PAGE, "layers", all_layers, lambda t: state.decode_list(t, int), state.options_valid(all_layers)))
    heads = c2.multiselect("KV heads", all_heads, key=state.bind(
        PAGE, "heads", all_heads, lambda t: state.decode_list(t, int), state.options_valid(all_heads)))
    kv = c3.segmented_control("tensor", KV, key=state.bind(PAGE, "kv", "keys", valid=state.options_valid(KV)))
    space = c3.segmented_control(
        "key space", SPACES, format_func=SPACE_LABEL.get, disabled=kv == "values",
        key=state.bind(PAGE, "space", "post_rope", valid=state.options_valid(SPACES)),
        help="Values carry no rotary embedding: their pre- and post-RoPE spectra are the same."
        if kv == "values" else "Keys as cached (post-RoPE) or before the rotary embedding.")
    transform = c4.radio("transform", TRANSFORMS, format_func=TRANSFORM_LABEL.get, horizontal=True,
                         key=state.bind(PAGE, "transform", "iwdft", valid=state.options_valid(TRANSFORMS)))
    per_head = c4.toggle("a line per head", key=state.bind(
        PAGE, "per_head", False, state.decode_bool))
    state.sync(PAGE, {"run": summary["key"], "layers": layers if layers != all_layers else None,
                      "heads": heads if heads != all_heads else None, "kv": kv, "space": space,
                      "transform": transform, "per_head": per_head or None})
    if not layers or not heads or kv is None or (space is None and kv == "keys"):
        ui.empty_state("Pick at least one layer, one head, a tensor and a key space.")
        return
    if kv == "values":
        st.caption("Values: one spectrum (the rotary embedding applies to keys only).")
    view = views.SpectraView(layers=tuple(layers), heads=tuple(heads), kv=kv,
                             space=space or "post_rope", transform=transform, per_head=per_head)
    for entry in views.spectra_entries(summary, data, view):
        ui.show_entry(entry)


main()
