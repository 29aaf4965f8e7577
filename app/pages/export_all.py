"""Export: the figures of stored runs and of the backend's stored generations (rebuilt, so they
survive a reload or a typed URL; the view this session last showed wins), and all of them as
one zip."""
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


def generation_label(g: dict) -> str:
    prov = views.generation_provenance(g, ui.model_name())
    return f"{g['created'][:16].replace('T', ' ')} · {prov['method']} · {prov['text']} · {g['id']}"


def entry_box(entry: export.FigureEntry, key: str) -> None:
    with st.container(border=True):
        st.markdown(f"**{entry.title}**  \n`{entry.stem()}`")
        st.caption(ui.provenance_line(entry.provenance))
        ui.export_buttons(entry, key=key)


def main() -> None:
    health = ui.page_setup("Export", "Figures of the stored runs and of the frequency lab's "
                           "generations. Images are PNG (2× scale), SVG or PDF; data as CSV; "
                           "what produced it as JSON. File names carry the model, method, ratio "
                           "and run.")
    if health is None:
        st.stop()
    runs = stored_runs()
    by_key = {r["key"]: r for r in runs}
    generations = {g["id"]: g for g in sorted(
        views.stored_generations(ui.call("listing stored generations", ui.client().jobs) or []),
        key=lambda g: g["created"], reverse=True)}
    shown = st.session_state.get(ui.FIGURES_KEY, {})
    session = [e for e in shown.values() if e.provenance.get("run") not in by_key
               and str(e.provenance.get("run")).removeprefix("gen-") not in generations]
    if not runs and not generations and not session:
        ui.empty_state("No figure yet: compute a run on Spectra, Ablation, Needle or Token "
                       "contribution (or re-run generation in the Frequency lab), then come back.")
        return
    entries: list[tuple[str, export.FigureEntry]] = []
    picked_models = set()
    if runs:
        st.subheader("Stored runs")
        picked = st.multiselect(
            "runs", list(by_key), default=default_runs(runs), key="export.runs",
            format_func=lambda k: f"{KIND_LABEL[by_key[k]['kind']]} · {ui.run_label(by_key[k])}",
            help="Figures are rebuilt from the store in each page's default view (or as you last "
                 "viewed them in this session).")
        picked_models |= {ui.run_model(by_key[k]) for k in picked}
        for key in picked:
            entries += [(f"{e.name}.{key[:10]}", e) for e in run_entries(by_key[key])]
    if generations:
        st.subheader("Frequency-lab generations")
        picked = st.multiselect("generations", list(generations), default=list(generations)[:1],
                                key="export.generations",
                                format_func=lambda k: generation_label(generations[k]),
                                help="The backend keeps every generation as a finished job.")
        for key in picked:
            g = generations[key]
            picked_models.add(g["result"].get("model") or ui.model_name())
            entries += [(f"{e.name}.{key}", shown.get(e.key(), e))
                        for e in views.generation_entries(g, ui.model_name())]
    if len(picked_models) > 1:
        st.warning(f"The picked figures come from {len(picked_models)} models "
                   f"({', '.join(sorted(map(str, picked_models)))}): the zip mixes them.",
                   icon=":material/warning:")
    entries += [(f"session.{e.key()}", e) for e in session]
    if not entries:
        ui.empty_state("Pick at least one run or generation.")
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
    for key, figure in entries:
        entry_box(figure, key)


main()
