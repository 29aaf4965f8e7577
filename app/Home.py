"""FAEDKV Lab: `streamlit run app/Home.py`. Navigation and the Overview page.

The app is presentation only: it talks to the backend (analysis.service.server) through
analysis.api.client. With FAEDKV_BACKEND_URL unset it starts a local backend on the embedded model.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from app import results_doc, ui  # noqa: E402

PAGES_DIR = Path(__file__).resolve().parent / "pages"

ABOUT = (
    "**FAEDKV** compresses a language model's KV cache in the frequency domain: along the token "
    "axis, the middle of the cache is turned into an *Infinite-Window DFT* whose state weights "
    "every past token equally, so old tokens are blurred instead of evicted. "
    "Each layer keeps only some frequency chunks of that spectrum (a *plan*: low-pass, by "
    "spectral energy, or by a per-layer ablation of each chunk), and attention runs over the "
    "reconstructed slots plus exact sink and recent tokens. "
    "FAEDKV's default here is what this lab's search found best on Qwen2.5-Coder-1.5B: the middle "
    "summarised by head dimension instead (exact dims plus each other dim's lowest token-axis "
    "frequencies), behind KVzip's ranking of the tokens to keep whole. "
    "This lab lets you look at per-layer spectra, edit plans and re-run generation, compare "
    "token contributions, watch needle-in-a-haystack grids fill in, and export every figure."
)


EVERY_MODEL = "every model"
RESULTS_SENTENCE = (
    "`docs/RESULTS.md` (in the repository, written by `python -m analysis.bench.results_report` from "
    "the shipped runs in `assets/results`) asks whether a frequency-domain cache beats eviction at "
    "equal budget on a real model, with its needle grids, continuation NLL, the configurations "
    "tried and the commands that made them. Its answer:")


def results_summary() -> None:
    """The repository's results document: what it says, its first table, all of it on demand."""
    st.subheader("Results")
    if not results_doc.RESULTS.exists():
        st.caption("`docs/RESULTS.md` is not in this checkout yet: "
                   "`python -m analysis.bench.results_report --store assets/results --out docs/RESULTS.md` "
                   "writes it from the shipped runs.")
        return
    text = results_doc.without_comments(results_doc.RESULTS.read_text(encoding="utf-8"))
    lead = results_doc.lead_sentence(text)
    st.markdown(RESULTS_SENTENCE + (f" {lead}" if lead else " (see the document)."))
    table = results_doc.first_table(text)
    if table:
        st.markdown(table)
    with st.expander("Read docs/RESULTS.md", icon=":material/description:"):
        st.markdown(text)


def overview() -> None:
    health = ui.page_setup("FAEDKV Lab", "Frequency-domain KV-cache compression, measured.")
    st.markdown(ABOUT)
    if health is None:
        st.stop()
    info = health.get("model") or {}
    queue = health.get("queue") or {}
    cols = st.columns(4)
    cols[0].metric("Model", info.get("name", "?"), help=f"source {info.get('source', '?')}, "
                   f"revision {info.get('revision', '?')}")
    cols[1].metric("Device · dtype", f"{info.get('device', '?')} · {info.get('dtype', '?')}")
    cols[2].metric("Layers × KV heads × head dim",
                   f"{info.get('num_layers', '?')} × {info.get('num_kv_heads', '?')} × "
                   f"{info.get('head_dim', '?')}", help=f"context {info.get('context_length', '?')}"
                   " tokens")
    running = queue.get("running")
    cols[3].metric("Backend", health.get("status", "?"),
                   f"{queue.get('queued', 0)} queued" + (", 1 running" if running else ""),
                   delta_color="off", help=f"at {ui.backend_url()}, commit {health.get('commit', '?')}")

    st.subheader("What do you want to do?")
    link_cols = st.columns(3)
    for i, (page, text) in enumerate(LINKS):
        with link_cols[i % 3].container(border=True):
            st.page_link(page, label=f"**{page.title}**", icon=page.icon)
            st.caption(text)

    results_summary()

    st.subheader("Recent runs")
    every = ui.runs(limit=200)
    if not every:
        ui.empty_state("No runs in the store yet. Compute one from a page (Spectra, Needle, "
                       "Ablation, Token contribution), or from the CLI: `python -m analysis`.")
        return
    models = ui.models_of(every)
    this = info.get("name")
    mine = {ui.model_label(r) for r in every if ui.same_model(r)}
    shown = st.selectbox("runs of", [EVERY_MODEL] + models, key="home.model",
                         format_func=lambda m: f"{m} (the backend's model)" if m in mine else m,
                         help=f"The store holds runs of {ui.plural(len(models), 'model')}; "
                              f"the backend holds {this}. Pages list another model's runs after "
                              "this model's and label them OTHER MODEL.")
    recent = [r for r in every if shown == EVERY_MODEL or ui.model_label(r) == shown][:20]
    table = pd.DataFrame([{
        "kind": r.get("kind"), "status": r.get("status"),
        "cells": f"{r.get('cells_done', 0)}/{r.get('cells_total') or '?'}",
        "model": ui.model_label(r), "created": str(r.get("created", ""))[:19].replace("T", " "),
        "key": r.get("key")} for r in recent])
    st.dataframe(table, hide_index=True, width="stretch")


st.set_page_config(page_title="FAEDKV Lab", page_icon=":material/graphic_eq:", layout="wide")

HOME = st.Page(overview, title="Overview", icon=":material/home:", default=True)
SPECTRA = st.Page(PAGES_DIR / "spectra.py", title="Spectra", icon=":material/graphic_eq:",
                  url_path="spectra")
LAB = st.Page(PAGES_DIR / "frequency_lab.py", title="Frequency lab", icon=":material/tune:",
              url_path="lab")
CONTRIB = st.Page(PAGES_DIR / "token_contribution.py", title="Token contribution",
                  icon=":material/stacked_line_chart:", url_path="contribution")
NEEDLE = st.Page(PAGES_DIR / "needle.py", title="Needle", icon=":material/search:",
                 url_path="needle")
ABLATION = st.Page(PAGES_DIR / "ablation.py", title="Ablation", icon=":material/grid_on:",
                   url_path="ablation")
EXPORT = st.Page(PAGES_DIR / "export_all.py", title="Export", icon=":material/download:",
                 url_path="export")
LINKS = [
    (SPECTRA, "Browse per-layer energy spectra of keys and values, post- or pre-RoPE."),
    (LAB, "Toggle the frequency chunks each layer keeps and re-run generation."),
    (NEEDLE, "Run a needle-in-a-haystack grid and watch depth × length fill in."),
    (ABLATION, "See which chunks matter per layer; derive plans from the ablation."),
    (CONTRIB, "Check that every past token contributes equally, against eviction."),
    (EXPORT, "Download every figure of this session: PNG, SVG, PDF, CSV, JSON, zip."),
]

navigation = st.navigation({"": [HOME], "Explore": [SPECTRA, LAB, CONTRIB],
                            "Experiments": [NEEDLE, ABLATION], "Share": [EXPORT]})
navigation.run()
