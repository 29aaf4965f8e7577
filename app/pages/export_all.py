"""Export: the figures of stored runs (rebuilt from the store, so they survive a reload or a
typed URL; the view this session last showed of a run wins), the session's generations, and
all of them as one zip."""
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:    # AppTest runs a page file on its own
    sys.path.insert(0, ROOT)

import streamlit as st  # noqa: E402

from app import export, ui, views  # noqa: E402

KIND_LABEL = {"spectra": "Spectra", "needle": "Needle", "ablate": "Ablation",
              "contrib": "Token contribution"}


def stored_runs() -> list[dict]:
    runs = [r for r in ui.runs(limit=200) if r.get("kind") in views.EXPORTABLE
            and r.get("status") == "complete"]
    return ui.current_model_first(runs)


def default_runs(runs: list[dict]) -> list[str]:
    """The newest complete run of each kind, of the backend's model."""
    chosen = {}
    for r in runs:
        if ui.same_model(r):
            chosen.setdefault(r["kind"], r["key"])
    return list(chosen.values())


def run_entries(summary: dict) -> list[export.FigureEntry]:
    """The run's figures in its page's default view, or as this session last showed them."""
    shown = st.session_state.get(ui.FIGURES_KEY, {})
    how = views.EXPORTABLE[summary["kind"]]
    if how.array is None:
        run = ui.run(summary["key"])
        source = (run or {}).get("records") if run else None
    else:
        source = ui.arrays(summary["key"], how.array)
    if source is None:
        return []
    built = how.build(summary, source)
    return [shown.get(e.key(), e) for e in built]


def entry_box(entry: export.FigureEntry, key: str) -> None:
    with st.container(border=True):
        st.markdown(f"**{entry.title}**  \n`{entry.stem()}`")
        st.caption(ui.provenance_line(entry.provenance))
        ui.export_buttons(entry, key=key)


def main() -> None:
    health = ui.page_setup("Export", "Figures of the stored runs and of this session's "
                           "generations. Images are PNG (2× scale), SVG or PDF; data as CSV; "
                           "what produced it as JSON. File names carry the model, method, ratio "
                           "and run.")
    if health is None:
        st.stop()
    runs = stored_runs()
    by_key = {r["key"]: r for r in runs}
    session = [e for e in st.session_state.get(ui.FIGURES_KEY, {}).values()
               if e.provenance.get("run") not in by_key]
    if not runs and not session:
        ui.empty_state("No figure yet: compute a run on Spectra, Ablation, Needle or Token "
                       "contribution (or re-run generation in the Frequency lab), then come back.")
        return
    entries: list[tuple[str, export.FigureEntry]] = []
    if runs:
        st.subheader("Stored runs")
        picked = st.multiselect(
            "runs", list(by_key), default=default_runs(runs), key="export.runs",
            format_func=lambda k: f"{KIND_LABEL[by_key[k]['kind']]} · {ui.run_label(by_key[k])}",
            help="Figures are rebuilt from the store in each page's default view (or as you last "
                 "viewed them in this session).")
        models = {ui.run_model(by_key[k]) for k in picked}
        if len(models) > 1:
            st.warning(f"The picked runs come from {len(models)} models "
                       f"({', '.join(sorted(models))}): the zip mixes them.",
                       icon=":material/warning:")
        for key in picked:
            entries += [(f"{e.name}.{key[:10]}", e) for e in run_entries(by_key[key])]
    entries += [(f"session.{e.key()}", e) for e in session]
    if not entries:
        ui.empty_state("Pick at least one run.")
        return
    formats = st.multiselect("image formats in the zip", export.IMAGE_FORMATS,
                             default=list(export.IMAGE_FORMATS), key="export.formats")
    chosen = [e for _, e in entries]

    def build_zip() -> bytes:
        return export.zip_bytes(chosen, tuple(formats))

    st.download_button(f"Download all {ui.plural(len(chosen), 'figure')} as a zip", data=build_zip,
                       file_name=f"faedkv-figures_{export.slug(ui.model_name())}.zip",
                       mime="application/zip", type="primary", icon=":material/folder_zip:",
                       on_click="ignore", key="export.zip")
    stored = [(k, e) for k, e in entries if not k.startswith("session.")]
    for key, entry in stored:
        entry_box(entry, key)
    if session:
        st.subheader("This session's generations")
        st.caption("Frequency-lab results are kept by the backend as finished generate jobs; "
                   "their figures are listed here while this session lasts.")
        for key, entry in entries[len(stored):]:
            entry_box(entry, key)


main()
