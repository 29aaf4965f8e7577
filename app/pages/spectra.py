"""Spectra: per-layer, per-head energy of keys/values along the token axis (a "spectra" run)."""
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:    # AppTest runs a page file on its own
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from analysis.params import SpectraParams  # noqa: E402
from app import figures, state, ui  # noqa: E402

PAGE = "spectra"
KV = ("keys", "values")
SPACES = ("post_rope", "pre_rope")
TRANSFORMS = ("iwdft", "dft")
SPACE_LABEL = {"post_rope": "post-RoPE", "pre_rope": "pre-RoPE"}
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
                st.session_state["spectra.job"] = job["id"]



def main() -> None:
    health = ui.page_setup("Spectra", "Where the energy of each layer's keys and values sits "
                           "along the token axis. FAEDKV keeps some frequency chunks per layer: "
                           "the dotted lines are the chunk grid.")
    if health is None:
        st.stop()
    context = int((health.get("model") or {}).get("context_length") or 8192)
    summaries = [r for r in ui.runs("spectra") if r.get("status") == "complete"]
    with st.expander("Compute spectra for another text length", expanded=not summaries,
                     icon=":material/add_chart:"):
        compute_form(context)
        ui.job_panel("spectra.job", on_done=ui.show_run_of(PAGE))
    if not summaries:
        ui.empty_state("No spectra run in the store yet: compute one above (about a minute on the "
                       "embedded model, a few seconds on the tiny one).")
        return

    summary = ui.pick_run(PAGE, "spectra", summaries)
    data = ui.arrays(summary["key"], "spectra")
    if data is None:
        return
    energy = np.asarray(data["energy"], dtype=float)     # (layers, heads, kv, space, transform, G)
    freqs = np.asarray(data["freqs"], dtype=float)
    chunk_energy = np.asarray(data["chunk_energy"], dtype=float) if "chunk_energy" in data else None
    layers_n, heads_n = energy.shape[:2]
    params = ui.run_params(summary)
    chunks = int(params.get("chunks") or (chunk_energy.shape[-1] if chunk_energy is not None else 22))
    all_layers, all_heads = list(range(layers_n)), list(range(heads_n))

    c1, c2, c3, c4 = st.columns([3, 2, 2, 3])
    layers = c1.multiselect("layers", all_layers, key=state.bind(
        PAGE, "layers", all_layers, lambda t: state.decode_list(t, int), state.options_valid(all_layers)))
    heads = c2.multiselect("KV heads", all_heads, key=state.bind(
        PAGE, "heads", all_heads, lambda t: state.decode_list(t, int), state.options_valid(all_heads)))
    kv = c3.segmented_control("tensor", KV, key=state.bind(PAGE, "kv", "keys", valid=state.options_valid(KV)))
    space = c3.segmented_control("key space", SPACES, format_func=SPACE_LABEL.get, key=state.bind(
        PAGE, "space", "post_rope", valid=state.options_valid(SPACES)))
    transform = c4.radio("transform", TRANSFORMS, format_func=TRANSFORM_LABEL.get, horizontal=True,
                         key=state.bind(PAGE, "transform", "iwdft", valid=state.options_valid(TRANSFORMS)))
    per_head = c4.toggle("a line per head", key=state.bind(
        PAGE, "per_head", False, state.decode_bool))
    state.sync(PAGE, {"run": summary["key"], "layers": layers if layers != all_layers else None,
                      "heads": heads if heads != all_heads else None, "kv": kv, "space": space,
                      "transform": transform, "per_head": per_head or None})
    if not layers or not heads or kv is None or space is None:
        ui.empty_state("Pick at least one layer, one head, a tensor and a key space.")
        return

    text_info = (summary.get("metrics") or {}).get("text") or {}
    k, s, t = KV.index(kv), SPACES.index(space), TRANSFORMS.index(transform)
    chosen = energy[np.ix_(layers, heads)][:, :, k, s, t, :]           # (L', H', G)
    prov = ui.provenance(model=ui.run_model(summary),
                         text=f"{params.get('num_tokens', '?')} tokens of essays from "
                              f"{text_info.get('first_essay', 'seed %s' % params.get('text_seed', 0))}",
                         method=f"{kv} {SPACE_LABEL[space]}, {transform}", budget="no compression")
    config = {"run": summary["key"], "params": params, "layers": layers, "heads": heads,
              "tensor": kv, "key_space": space, "transform": transform}

    layer_mean = chosen.mean(axis=1)                                   # (L', G)
    fig = figures.spectra_heatmap(freqs, layer_mean, layers, chunks)
    frame = pd.DataFrame(layer_mean.T, columns=[f"L{l}" for l in layers]).assign(freq=freqs)
    ui.show_figure("spectra-heatmap", f"Energy of {kv} by layer and frequency (mean of "
                   f"{len(heads)} heads, log scale)", fig, prov, frame, config)

    if per_head:
        lines = {f"L{l} H{h}": chosen[i, j] for i, l in enumerate(layers) for j, h in enumerate(heads)}
    else:
        lines = {f"L{l}": layer_mean[i] for i, l in enumerate(layers)}
    fig = figures.spectra_lines(freqs, lines, chunks)
    frame = pd.DataFrame({k_: v for k_, v in lines.items()}).assign(freq=freqs)
    ui.show_figure("spectra-lines", f"Spectra of {kv}, " + ("per head" if per_head else
                   "per layer"), fig, prov, frame, config)

    if chunk_energy is not None:
        share = chunk_energy[np.ix_(layers, heads)][:, :, k, s, t, :].mean(axis=1)
        share = share / np.maximum(share.sum(axis=1, keepdims=True), 1e-30)
        fig = figures.layer_chunk_heatmap(share, "energy share", layers=layers, diverging=False)
        frame = pd.DataFrame(share, columns=[f"chunk{c}" for c in range(share.shape[1])]).assign(
            layer=layers)
        ui.show_figure("spectra-chunk-share", f"Share of each layer's {kv} energy per chunk "
                       "(what an energy plan keeps)", fig, prov, frame, config)


main()
